//! The RD Station sweep: the "all contacts" segmentation against the contacts the ledger
//! expects rdstation-sink to have written (`altered`, `missing`; see [`crate::contact`]).

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use rdstation_sink::client::{Budget as RdBudget, RdSettings};
use reqwest::Method;
use serde_json::Value;

use super::{Cut, SweepArgs, Sweeps};
use crate::contact::{CONTACT, ContactPrint, Listed};
use crate::ledger::{DriftKind, Entry, Health};
use crate::store::{CommandSink, Ledger, now_ms};

impl Sweeps {
    /// One RD Station round: lists the contacts segmentation page by page (125 a call) and
    /// compares each contact Elo wrote with the ledger's fingerprint. A contact missing from
    /// the list is only judged when the whole list was read.
    pub async fn rdstation_round<C: CommandSink>(&self, ledger: &Ledger<C>) {
        let Some((client, budget)) = self.rdstation.as_ref() else { return };
        if !budget.set_share(ledger.held_count(), self.partitions) {
            return; // nothing held here
        }
        let now = now_ms();
        let hold = self.args.rd_deferred_hold.as_millis() as i64;
        let expected = expected_contacts(ledger, self.args.grace.as_millis() as i64, hold, now);
        let mut spent = 0;
        let segmentation = match self.args.rd_segmentation {
            Some(id) => id,
            None => {
                if !budget.spend(&mut spent).await {
                    budget.round("partial");
                    return;
                }
                match client.request(Method::GET, "/platform/segmentations", None, RdBudget::None).await {
                    Ok(body) => match standard_segmentation(&body) {
                        Some(id) => id,
                        None => {
                            tracing::warn!(
                                "rdstation sweep: the account has no standard segmentation; set --rdstation-sweep-segmentation"
                            );
                            budget.round("failed");
                            return;
                        }
                    },
                    Err(error) => {
                        tracing::warn!(error = %error, "rdstation sweep: cannot list segmentations");
                        budget.round("failed");
                        return;
                    }
                }
            }
        };
        // A listing longer than one round's budget resumes where the last round stopped, with
        // what that round read, so big accounts are read to the end.
        let resume = std::mem::take(&mut *self.rd_listing.lock().expect("rd listing"));
        let spent = std::sync::Mutex::new(spent);
        let walked = walk_listing(resume, |page| {
            let spent = &spent;
            async move {
                let mut n = *spent.lock().expect("spent");
                let paid = budget.spend(&mut n).await;
                *spent.lock().expect("spent") = n;
                if !paid {
                    return None;
                }
                let path = format!("/platform/segmentations/{segmentation}/contacts?page={page}&page_size=125");
                Some(client.request(Method::GET, &path, None, RdBudget::None).await.map_err(|e| e.to_string()))
            }
        })
        .await;
        let (listed, complete) = match walked {
            Walked::Done(listed) => {
                *self.rd_listing.lock().expect("rd listing") = Listing::default();
                (listed, true)
            }
            Walked::Cut(listing) => {
                let listed = listing.1.clone();
                *self.rd_listing.lock().expect("rd listing") = listing;
                (listed, false)
            }
            Walked::Failed(listing) => {
                // Nothing is judged: while the listing keeps failing, the pages read before would
                // grow staler every round and contacts the sink rewrote since would read as
                // altered. The walk resumes at the failed page once RD answers again.
                *self.rd_listing.lock().expect("rd listing") = listing;
                budget.round(Cut::Failed.result());
                return;
            }
            Walked::Malformed(listing) => {
                // Not a listing: judging it as an empty account would flag every contact.
                tracing::warn!(page = listing.0, "rdstation sweep: listing without a contacts array; round failed");
                *self.rd_listing.lock().expect("rd listing") = listing;
                budget.round("failed");
                return;
            }
        };
        budget.checked(expected.len() as u64);
        let drift = contact_drift(&expected, &listed, complete);
        tracing::info!(
            expected = expected.len(),
            listed = listed.len(),
            complete,
            drift = drift.len(),
            "rdstation sweep round"
        );
        let name = |i: usize, kind: DriftKind| format!("{}:{}", expected[i].key, kind.as_str());
        let names: Vec<String> = drift.iter().map(|(i, kind)| name(*i, *kind)).collect();
        let confirmed = self.rd_suspects.confirm(&names, self.args.grace.as_millis() as i64, now_ms());
        for (i, kind) in drift {
            if !confirmed.contains(&name(i, kind)) {
                continue;
            }
            let c = &expected[i];
            match ledger.flag(c.partition, &c.key, "rdstation", kind, 0, || None).await {
                Ok(true) => {
                    budget.progress.found.fetch_add(1, Ordering::Relaxed);
                }
                Ok(false) => {}
                Err(error) => tracing::warn!(error = %error, key = %c.key, "rdstation sweep: cannot record drift"),
            }
        }
        budget.round(if complete { "complete" } else { Cut::Budget.result() });
    }
}

/// The rows of one listing page; `None` when the body is not a listing (no `contacts` array).
pub(super) fn listed_rows(body: &Value) -> Option<Vec<Value>> {
    body.get("contacts").and_then(Value::as_array).cloned()
}

/// Where an RD listing stands: the next page (0 or 1: the first) and the contacts read so far
/// (uuid -> fingerprints).
pub(super) type Listing = (u32, HashMap<String, Listed>);

/// How a walk through the listing ended.
#[derive(Debug)]
pub(super) enum Walked {
    /// Read to its last page.
    Done(HashMap<String, Listed>),
    /// Cut short by the budget: resume from here.
    Cut(Listing),
    /// Cut short by a failed call: resume from here, and the round counts as failed.
    Failed(Listing),
    /// A page without a `contacts` array: the round failed (resume from that page).
    Malformed(Listing),
}

/// Walks the listing from `resume`; `fetch(page)` is `None` when the budget is spent.
pub(super) async fn walk_listing<F, Fut>(resume: Listing, mut fetch: F) -> Walked
where
    F: FnMut(u32) -> Fut,
    Fut: Future<Output = Option<Result<Value, String>>>,
{
    let (mut page, mut listed) = (resume.0.max(1), resume.1);
    loop {
        let body = match fetch(page).await {
            None => return Walked::Cut((page, listed)),
            Some(Ok(body)) => body,
            Some(Err(error)) => {
                tracing::warn!(error = %error, "rdstation sweep: listing failed");
                return Walked::Failed((page, listed));
            }
        };
        let Some(rows) = listed_rows(&body) else { return Walked::Malformed((page, listed)) };
        for row in &rows {
            if let Some(uuid) = row.get("uuid").and_then(Value::as_str) {
                let email = row.get("email").and_then(Value::as_str).unwrap_or_default();
                let name = row.get("name").and_then(Value::as_str).unwrap_or_default();
                listed.insert(uuid.to_owned(), Listed::of(email, name));
            }
        }
        if rows.len() < 125 {
            return Walked::Done(listed);
        }
        page += 1;
    }
}

/// A contact the ledger expects in RD Station.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExpectedContact {
    /// The contact's uuid, when an outcome named it (a write the sink deferred names none: the
    /// contact is then found by its e-mail).
    pub uuid: Option<String>,
    pub print: ContactPrint,
    pub partition: i32,
    /// The ledger entry whose customer block the contact follows (the one flagged).
    pub key: String,
}

/// The outcome id rdstation-sink sets when it deferred the contact write (account or contact
/// budget spent): RD holds an older contact, or none yet, until its deferred-writes pass lands it.
pub const CONTACT_DEFERRED: &str = "contact_deferred";

/// Per customer: the contact the sink writes (its contact mark) and the contact uuid RD
/// reported if any, when RD confirmed the entry that brought the newest customer block more than
/// `grace` ago and no drift is open on it. A contact whose newest outcome says the write was
/// deferred is left alone for `deferred_hold` (that pass publishes no outcome of its own).
pub fn expected_contacts<C: CommandSink>(
    ledger: &Ledger<C>,
    grace: i64,
    deferred_hold: i64,
    now: i64,
) -> Vec<ExpectedContact> {
    let sla = ledger.policy.targets.iter().find(|t| t.name == "rdstation").map(|t| t.sla).unwrap_or_default();
    let mut out = Vec::new();
    for partition in ledger.partitions() {
        out.extend(expected_in(partition, &ledger.store.entries(partition), sla, grace, deferred_hold, now));
    }
    out
}

/// [`expected_contacts`] over one partition's entries.
pub fn expected_in(
    partition: i32,
    entries: &[(String, Entry)],
    sla: Duration,
    grace: i64,
    deferred_hold: i64,
    now: i64,
) -> Vec<ExpectedContact> {
    let by_key: HashMap<&str, &Entry> = entries.iter().map(|(k, e)| (k.as_str(), e)).collect();
    let mut uuids: HashMap<&str, (i64, &str)> = HashMap::new();
    // Per customer: when RD's newest outcome was read, and whether it deferred the write.
    let mut newest: HashMap<&str, (i64, bool)> = HashMap::new();
    for (_, entry) in entries {
        let Some(t) = entry.targets.get("rdstation") else { continue };
        if entry.is_mark() {
            continue;
        }
        let deferred = t.ids.contains_key(CONTACT_DEFERRED);
        let slot = newest.entry(&entry.customer_key).or_insert((t.at_ms, deferred));
        if t.at_ms >= slot.0 {
            *slot = (t.at_ms, deferred);
        }
        if let Some(uuid) = t.ids.get("contact_uuid") {
            let slot = uuids.entry(&entry.customer_key).or_insert((t.at_ms, uuid));
            if t.at_ms >= slot.0 {
                *slot = (t.at_ms, uuid);
            }
        }
    }
    let mut out = Vec::new();
    for (_, mark) in entries.iter().filter(|(_, e)| e.kind == CONTACT) {
        let Some(print) = &mark.contact else { continue };
        let uuid = uuids.get(mark.customer_key.as_str()).map(|(_, u)| (*u).to_owned());
        if newest.get(mark.customer_key.as_str()).is_some_and(|(at, deferred)| *deferred && now - at < deferred_hold) {
            continue; // RD holds an older contact (or none) until the deferred write lands
        }
        // The entry whose event brought the newest block: gone (retired), nothing to flag.
        let Some(entry) = by_key.get(print.key.as_str()) else { continue };
        let settled = entry.health("rdstation", sla, now) == Health::Confirmed
            && entry.targets.get("rdstation").is_some_and(|t| now - t.at_ms > grace);
        if settled {
            out.push(ExpectedContact { uuid, print: print.clone(), partition, key: print.key.clone() });
        }
    }
    out
}

/// The expected contacts (by index) that differ from the listing (`altered`) or, when the
/// listing is `complete`, are gone (`missing`). A contact is looked up by its uuid, or by its
/// e-mail when no outcome named the uuid; such a contact is never `missing` (no outcome said
/// RD has it: the sink may not have created it yet).
pub fn contact_drift(
    expected: &[ExpectedContact],
    listed: &HashMap<String, Listed>,
    complete: bool,
) -> Vec<(usize, DriftKind)> {
    let by_email: HashMap<u64, &Listed> = listed.values().map(|l| (l.email, l)).collect();
    expected
        .iter()
        .enumerate()
        .filter_map(|(i, c)| {
            let found = match &c.uuid {
                Some(uuid) => listed.get(uuid),
                None => c.print.email_short().and_then(|e| by_email.get(&e)).copied(),
            };
            match found {
                Some(l) if !c.print.matches(l) => Some((i, DriftKind::Altered)),
                None if complete && c.uuid.is_some() => Some((i, DriftKind::Missing)),
                _ => None,
            }
        })
        .collect()
}

/// The id of the first standard segmentation (RD's "all contacts").
fn standard_segmentation(body: &Value) -> Option<u64> {
    body.get("segmentations")?.as_array()?.iter().find(|s| s["standard"] == true)?.get("id")?.as_u64()
}

/// RD client settings: secrets from files; against a loopback URL (the local sandbox) the
/// sandbox's client secret and control API stand in, as for rdstation-sink.
pub(super) fn rd_settings(args: &SweepArgs) -> anyhow::Result<RdSettings> {
    let local = args.rd_url.starts_with("http://127.0.0.1") || args.rd_url.starts_with("http://localhost");
    let client_secret = match &args.rd_client_secret_file {
        Some(path) => RdSettings::read_secret(path)?,
        None if local => "elo-rd-secret".to_owned(),
        None => anyhow::bail!("the RD Station client secret file is required (ELO_RDSTATION_CLIENT_SECRET_FILE)"),
    };
    let (refresh_token, sandbox_control) = match &args.rd_refresh_token_file {
        Some(path) => (Some(RdSettings::read_secret(path)?), None),
        None if local => (None, Some(args.rd_sandbox_control.clone())),
        None => anyhow::bail!("the RD Station refresh token file is required (ELO_RDSTATION_REFRESH_TOKEN_FILE)"),
    };
    Ok(RdSettings {
        base_url: args.rd_url.clone(),
        client_id: args.rd_client_id.clone(),
        client_secret,
        refresh_token,
        sandbox_control,
        contacts_per_minute: args.rd_per_minute,
        request_timeout: Duration::from_secs(30),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::ledger::tests::event;

    const HOLD: i64 = 3_600_000;

    /// The ledger after one order event per (order, version, first name), in this order, each
    /// confirmed by RD at `confirmed_at` with contact `u1`.
    fn rd_ledger(orders: &[(&str, i64, &str)], confirmed_at: i64) -> Vec<(String, Entry)> {
        let mut entries: Vec<(String, Entry)> = Vec::new();
        let mut mark = None;
        for (id, version, name) in orders {
            let mut ev = event("order", id, "c:1", *version);
            ev.customer.as_mut().unwrap().firstname = Some((*name).into());
            ev.customer.as_mut().unwrap().lastname = None;
            let key = format!("order:{id}");
            let mut e = Entry::for_event(&ev);
            e.apply_event(&ev, 0);
            let mut o =
                crate::ledger::tests::outcome("rdstation", "order", id, *version, elo_events::OutcomeStatus::Applied);
            o.target_ids.insert("contact_uuid".into(), "u1".into());
            e.apply_outcome(&o, confirmed_at);
            mark = crate::contact::fold(mark.clone(), &ev, &key, 0).or(mark);
            entries.push((key, e));
        }
        entries.push((crate::contact::contact_key("c:1"), mark.unwrap()));
        entries
    }

    #[test]
    fn the_contact_follows_the_customers_newest_block_and_drift_is_found() {
        let sla = Duration::from_secs(60);
        let entries = rd_ledger(&[("2", 200, "New"), ("1", 100, "Old")], 10);
        let expected = expected_in(3, &entries, sla, 5, HOLD, 1_000);
        assert_eq!(expected.len(), 1, "one contact per customer");
        let email = elo_events::sample::order_placed(1).customer.unwrap().email;
        assert_eq!(expected[0].key, "order:2", "the older block read later changes nothing");
        assert_eq!((expected[0].uuid.as_deref(), expected[0].partition), (Some("u1"), 3));
        assert!(expected_in(3, &entries, sla, 5_000, HOLD, 1_000).is_empty(), "confirmed too recently: left alone");

        let mut listed = HashMap::from([("u1".to_owned(), Listed::of(&email, "New"))]);
        assert!(contact_drift(&expected, &listed, true).is_empty());
        listed.insert("u1".into(), Listed::of(&email, "Edited"));
        assert_eq!(contact_drift(&expected, &listed, true), vec![(0, DriftKind::Altered)]);
        listed.clear();
        assert!(contact_drift(&expected, &listed, false).is_empty(), "a partial listing proves no absence");
        assert_eq!(contact_drift(&expected, &listed, true), vec![(0, DriftKind::Missing)]);

        // No outcome named the uuid (the sink deferred the write): found by its e-mail.
        let mut unnamed = expected.clone();
        unnamed[0].uuid = None;
        let mut listed = HashMap::from([("u9".to_owned(), Listed::of(&email, "New"))]);
        assert!(contact_drift(&unnamed, &listed, true).is_empty());
        listed.insert("u9".into(), Listed::of(&email, "Edited"));
        assert_eq!(contact_drift(&unnamed, &listed, true), vec![(0, DriftKind::Altered)]);
        listed.insert("u9".into(), Listed::of("someone.else@example.com", "New"));
        assert!(contact_drift(&unnamed, &listed, true).is_empty(), "no uuid: RD never said it has it");
    }

    /// The ledger of `rd_ledger`, its outcomes replaced by ones naming no contact: the sink
    /// deferred the write (account budget spent), with `ids` as the outcome's target ids.
    fn deferred_ledger(ids: &[(&str, &str)]) -> Vec<(String, Entry)> {
        let mut entries = rd_ledger(&[("1", 100, "New")], 10);
        let entry = &mut entries[0].1;
        let target = entry.targets.get_mut("rdstation").unwrap();
        target.ids = ids.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        entries
    }

    /// Two sweep rounds, a grace apart, over a complete listing of other contacts: what would
    /// be flagged (a flag is what sends a repair command).
    fn two_rounds(entries: &[(String, Entry)]) -> Vec<String> {
        let (sla, grace) = (Duration::from_secs(60), 5);
        let listed = HashMap::from([("u7".to_owned(), Listed::of("someone.else@example.com", "X"))]);
        let suspects = super::super::Suspects::default();
        let mut flagged = Vec::new();
        for now in [1_000, 1_000 + grace] {
            let expected = expected_in(0, entries, sla, grace, HOLD, now);
            let names: Vec<String> = contact_drift(&expected, &listed, true)
                .into_iter()
                .map(|(i, kind)| format!("{}:{}", expected[i].key, kind.as_str()))
                .collect();
            flagged.extend(suspects.confirm(&names, grace, now));
        }
        flagged
    }

    #[test]
    fn a_deferred_creation_is_not_missing() {
        // The outcome says the write was deferred: the contact is left alone.
        let deferred = deferred_ledger(&[(CONTACT_DEFERRED, "1")]);
        assert!(two_rounds(&deferred).is_empty());
        let expected = expected_in(0, &deferred, Duration::from_secs(60), 5, HOLD, 10 + HOLD);
        assert_eq!(expected.len(), 1, "judged again once the hold is over");
        // An outcome of an older sink, naming no contact: never judged missing (no uuid to miss).
        assert!(two_rounds(&deferred_ledger(&[])).is_empty());
        // The control: a contact RD named and that is gone is missing.
        assert_eq!(two_rounds(&rd_ledger(&[("1", 100, "New")], 10)), vec!["order:1:missing".to_owned()]);
    }

    #[test]
    fn the_standard_segmentation_is_found() {
        let body = json!({"segmentations": [{"id": 4, "standard": false}, {"id": 1, "standard": true}]});
        assert_eq!(standard_segmentation(&body), Some(1));
        assert_eq!(standard_segmentation(&json!({"segmentations": []})), None);
    }

    #[test]
    fn a_body_without_contacts_is_not_an_empty_listing() {
        assert_eq!(listed_rows(&json!({"errors": {"error_type": "x"}})), None);
        assert_eq!(listed_rows(&json!({"contacts": "nope"})), None);
        assert_eq!(listed_rows(&json!({"contacts": []})), Some(vec![]));
    }

    #[tokio::test]
    async fn a_listing_longer_than_a_rounds_budget_is_read_to_the_end() {
        // 300 contacts, 125 a page, two pages per round.
        let page_of = |page: u32| {
            let rows: Vec<Value> = (0..300)
                .skip((page as usize - 1) * 125)
                .take(125)
                .map(|i| json!({"uuid": format!("u{i}"), "email": format!("c{i}@example.com"), "name": "N"}))
                .collect();
            json!({ "contacts": rows })
        };
        let mut resume = Listing::default();
        for round in 0..3 {
            let mut calls = 0;
            let walked = walk_listing(std::mem::take(&mut resume), |page| {
                calls += 1;
                let body = (calls <= 2).then(|| Ok(page_of(page)));
                async move { body }
            })
            .await;
            match walked {
                Walked::Done(listed) => {
                    assert_eq!(listed.len(), 300, "every contact, across rounds");
                    assert_eq!(round, 1);
                    return;
                }
                Walked::Cut(listing) => resume = listing,
                Walked::Failed(_) => panic!("no call failed"),
                Walked::Malformed(_) => panic!("malformed"),
            }
        }
        panic!("never read to the end");
    }

    /// A listing call that fails (RD down, a refused token) is a failed round, not a budget
    /// cut: `EloSweepFailing` counts on it. What was read is kept and the walk resumes there.
    #[tokio::test]
    async fn a_failed_listing_call_fails_the_round_and_keeps_what_was_read() {
        let page_of = |page: u32| {
            let rows: Vec<Value> = (0..125)
                .map(|i| json!({"uuid": format!("p{page}-{i}"), "email": format!("c{page}-{i}@example.com"), "name": "N"}))
                .collect();
            json!({ "contacts": rows })
        };
        let walked = walk_listing(Listing::default(), |page| {
            let body = if page == 1 { Ok(page_of(page)) } else { Err("401 unauthorized".to_owned()) };
            async move { Some(body) }
        })
        .await;
        match walked {
            Walked::Failed((page, listed)) => {
                assert_eq!(page, 2, "resumes at the page that failed");
                assert_eq!(listed.len(), 125, "the first page is kept");
            }
            other => panic!("a failed call must fail the walk, got {other:?}"),
        }
        assert_eq!(Cut::Failed.result(), "failed");
        assert_eq!(Cut::Budget.result(), "partial");
    }
}
