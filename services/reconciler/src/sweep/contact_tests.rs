//! The RD sweep must expect exactly the contact rdstation-sink writes: the sink's own code
//! (`CustomerState::apply`, `contacts::desired`) is the ground truth here.

use std::collections::HashMap;
use std::time::Duration;

use elo_events::{CommerceEvent, OutcomeStatus};
use rdstation_sink::aggregates::CustomerState;

use super::rdstation::{contact_drift, expected_in};
use crate::ledger::tests::{event, outcome};
use crate::ledger::{DriftKind, Entry};

const SLA: Duration = Duration::from_secs(60);

/// An order event of customer `c:1` with this name.
fn block(order: &str, version: i64, first: Option<&str>, last: Option<&str>) -> CommerceEvent {
    let mut e = event("order", order, "c:1", version);
    let c = e.customer.as_mut().unwrap();
    (c.firstname, c.lastname) = (first.map(str::to_owned), last.map(str::to_owned));
    e
}

/// The name rdstation-sink writes after `events` (in arrival order), by the sink's own code.
fn sink_name(events: &[CommerceEvent]) -> Option<String> {
    let mut state = CustomerState::default();
    for e in events {
        state.apply(e);
    }
    let desired = rdstation_sink::contacts::desired(&state, &state.aggregate(0), &Default::default());
    desired.fields.get("name").and_then(|v| v.as_str()).map(str::to_owned)
}

/// The ledger after `events` (in arrival order, as `Ledger::handle` folds them), every order
/// confirmed by RD long ago.
fn ledger(events: &[CommerceEvent]) -> Vec<(String, Entry)> {
    let mut entries: Vec<(String, Entry)> = Vec::new();
    let mut mark: Option<Entry> = None;
    for e in events {
        let key = format!("order:{}", e.source_version.entity_id);
        let at = entries.iter().position(|(k, _)| *k == key).unwrap_or_else(|| {
            entries.push((key.clone(), Entry::for_event(e)));
            entries.len() - 1
        });
        entries[at].1.apply_event(e, 0);
        mark = crate::contact::fold(mark.clone(), e, &key, 0).or(mark);
    }
    for (_, entry) in &mut entries {
        let mut o = outcome("rdstation", "order", &entry.entity_id, entry.version, OutcomeStatus::Applied);
        o.target_ids.insert("contact_uuid".into(), "u1".into());
        entry.apply_outcome(&o, 10);
    }
    entries.push((crate::contact::contact_key("c:1"), mark.expect("a contact mark")));
    entries
}

/// What the sweep finds when RD lists the contact with `name`.
fn judge(entries: &[(String, Entry)], name: &str) -> Vec<DriftKind> {
    let email = event("order", "1", "c:1", 1).customer.unwrap().email;
    let expected = expected_in(0, entries, SLA, 5, 0, 1_000_000);
    assert_eq!(expected.len(), 1, "the contact is judged");
    let listed = HashMap::from([("u1".to_owned(), crate::contact::Listed::of(&email, name))]);
    contact_drift(&expected, &listed, true).into_iter().map(|(_, kind)| kind).collect()
}

#[test]
fn the_sweep_expects_the_name_the_sink_merges_from_earlier_blocks() {
    // A later order without a last name: the sink keeps "Lima" from the first one.
    let events = [block("1", 100, Some("Ana"), Some("Lima")), block("2", 200, Some("Ana"), None)];
    let written = sink_name(&events).unwrap();
    assert_eq!(written, "Ana Lima");
    let entries = ledger(&events);
    assert_eq!(judge(&entries, &written), vec![], "what the sink wrote is no drift");
    assert_eq!(judge(&entries, "Ana"), vec![DriftKind::Altered], "a contact edited behind Elo's back is found");
    assert_eq!(judge(&entries, "Someone Else"), vec![DriftKind::Altered]);
}

#[test]
fn the_sweep_follows_the_sinks_arrival_order_between_equal_versions() {
    // Two orders of one guest e-mail placed in the same millisecond: the later one read wins.
    for events in [
        [block("3", 300, Some("Bea"), Some("Souza")), block("4", 300, Some("Caio"), Some("Dias"))],
        [block("4", 300, Some("Caio"), Some("Dias")), block("3", 300, Some("Bea"), Some("Souza"))],
    ] {
        let written = sink_name(&events).unwrap();
        let entries = ledger(&events);
        assert_eq!(judge(&entries, &written), vec![], "{written}: no drift");
        let other = if written == "Caio Dias" { "Bea Souza" } else { "Caio Dias" };
        assert_eq!(judge(&entries, other), vec![DriftKind::Altered], "{other} is not what the sink wrote");
    }
}

#[test]
fn names_with_inner_spaces_and_missing_parts_match_what_the_sink_wrote() {
    let cases: [&[CommerceEvent]; 3] = [
        &[block("1", 100, Some("Maria da"), Some("Silva Santos"))],
        &[block("1", 100, None, Some("Lima")), block("2", 200, Some("Ana"), None)],
        &[block("1", 100, Some(" Ana "), Some("")), block("2", 200, None, None)],
    ];
    for events in cases {
        let written = sink_name(events).unwrap();
        let entries = ledger(events);
        assert_eq!(judge(&entries, &written), vec![], "{written:?}: what the sink wrote");
        assert_eq!(judge(&entries, &format!("{written} X")), vec![DriftKind::Altered], "{written:?} edited");
    }
}
