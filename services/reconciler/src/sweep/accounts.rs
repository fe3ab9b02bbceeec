//! The Salesforce sweep's Accounts: the Accounts the sink's confirmed writes named (its outcomes
//! carry the `Account` id) are looked up by `Id` with the orders they belong to (one query per
//! batch of orders), and changed by `LastModifiedDate` after Elo's confirmed write. An edited
//! Account is drift of the entry last confirmed with it (by confirmation time): its `RESEND`
//! rewrites the Account with it (the sink upserts the Account by external id in the same
//! graph). A deleted one is drift of every held entry pointing at it (their `RESEND`s recreate
//! it and point each at it again, in one round).
//!
//! Elo's own writes are not drift: an Account is judged only when every held entry naming it
//! is confirmed (a returning customer's newer order rewrites it before its outcome is read),
//! against the newest of their confirmations, and an edit counts only when a second round, a
//! grace later, still finds it unexplained by a confirmation read meanwhile. An Account whose
//! external id is another customer key than those of the entries naming it here is written
//! through salesforce-sink's alias (a guest who registered later: two keys, likely on two
//! partitions, one Account): only the replica holding the key it was created for judges it,
//! so two replicas never take turns repairing it.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;

use serde_json::Value;

use super::salesforce::{edited_after, missing_ids, parse_sf_datetime, query_charged};
use super::{Budget, Cut, Sweeps};
use crate::ledger::{DriftKind, Entry, Health};
use crate::store::{CommandSink, Ledger, now_ms};

/// What the ledger knows of one Salesforce Account: the entry last confirmed with it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AccountRef {
    pub partition: i32,
    pub key: String,
    /// When that write was confirmed (Unix ms): the newest confirmation of the entries naming it.
    pub confirmed_ms: i64,
    /// Every held entry naming it is confirmed (none has a newer version on its way, failed
    /// or is overdue): only then is it judged.
    pub settled: bool,
    /// The customer keys of the entries naming it.
    pub customer_keys: BTreeSet<String>,
    /// Every held entry pointing at it (partition, key): those naming it and every other entry
    /// of its customer keys (an order written without its customer's data, e.g. a status change
    /// of an older order, names no Account yet points at the customer's). A gone Account is
    /// missing on each (one rewrite each, in one round, rather than one a round).
    pub named_by: Vec<(i32, String)>,
}

impl AccountRef {
    /// Whether this replica judges an Account whose external id is `external_key` (`None`:
    /// not read): settled, and not written here through another key's alias.
    pub fn judged_here(&self, external_key: Option<&str>) -> bool {
        self.settled && external_key.is_none_or(|k| self.customer_keys.contains(k))
    }
}

/// The Accounts named by the Salesforce outcomes of `entries`, by Salesforce id.
pub fn accounts_in(
    partition: i32,
    entries: &[(String, Entry)],
    sla: std::time::Duration,
    now: i64,
    out: &mut HashMap<String, AccountRef>,
) {
    for (key, entry) in entries {
        let Some(t) = entry.targets.get("salesforce") else { continue };
        let Some(account) = t.ids.get("Account") else { continue };
        if entry.is_mark() {
            continue;
        }
        let confirmed = entry.health("salesforce", sla, now) == Health::Confirmed;
        let slot = out.entry(account.clone()).or_insert_with(|| AccountRef { settled: true, ..AccountRef::default() });
        slot.settled &= confirmed;
        slot.customer_keys.insert(entry.customer_key.clone());
        slot.named_by.push((partition, key.clone()));
        if confirmed && (slot.key.is_empty() || t.at_ms > slot.confirmed_ms) {
            (slot.partition, slot.key, slot.confirmed_ms) = (partition, key.clone(), t.at_ms);
        }
    }
}

/// Adds to each Account's `named_by` the other entries of `entries` (of `partition`) written to
/// Salesforce under one of its customer keys.
pub fn customers_point_at_accounts(
    partition: i32,
    entries: &[(String, Entry)],
    accounts: &mut HashMap<String, AccountRef>,
) {
    let mut of_customer: HashMap<&str, Vec<&str>> = HashMap::new();
    for (key, entry) in entries {
        if !entry.is_mark() && entry.targets.contains_key("salesforce") {
            of_customer.entry(entry.customer_key.as_str()).or_default().push(key);
        }
    }
    for account in accounts.values_mut() {
        let extra: Vec<(i32, String)> = account
            .customer_keys
            .iter()
            .flat_map(|c| of_customer.get(c.as_str()).into_iter().flatten())
            .map(|k| (partition, (*k).to_owned()))
            .filter(|e| !account.named_by.contains(e))
            .collect();
        account.named_by.extend(extra);
    }
}

/// The held Accounts (see [`accounts_in`], [`customers_point_at_accounts`]).
pub(super) fn held_accounts<C: CommandSink>(ledger: &Ledger<C>, held: &[i32], now: i64) -> HashMap<String, AccountRef> {
    let sla = ledger.policy.targets.iter().find(|t| t.name == "salesforce").map(|t| t.sla).unwrap_or_default();
    let mut accounts = HashMap::new();
    let entries: Vec<(i32, Vec<(String, Entry)>)> = held.iter().map(|&p| (p, ledger.store.entries(p))).collect();
    for (partition, entries) in &entries {
        accounts_in(*partition, entries, sla, now, &mut accounts);
    }
    for (partition, entries) in &entries {
        customers_point_at_accounts(*partition, entries, &mut accounts);
    }
    accounts
}

/// Of the asked Account ids, those gone from `records` that this replica judges: the entries
/// pointing at each (their rewrites bring it back, and point them at it).
pub fn missing_accounts(
    asked: &[String],
    records: &[Value],
    accounts: &HashMap<String, AccountRef>,
) -> Vec<(i32, String)> {
    missing_ids(asked, records, "Id")
        .into_iter()
        .filter_map(|id| accounts.get(&id).filter(|a| a.judged_here(None)))
        .flat_map(|a| a.named_by.iter().cloned())
        .collect()
}

/// Account edits waiting for their second round: Account id -> (its `LastModifiedDate`, external
/// key, when first found).
pub type AccountSuspects = HashMap<String, (i64, Option<String>, i64)>;

/// Adds this round's edits (`(id, LastModifiedDate, external key)`) to `suspects` and returns
/// the Accounts to flag: those first found at least `grace` ago that the ledger still cannot
/// explain (judged here, modified after the newest confirmation). Explained ones are dropped.
pub fn confirm_account_edits(
    suspects: &mut AccountSuspects,
    found: Vec<(String, i64, Option<String>)>,
    accounts: &HashMap<String, AccountRef>,
    grace: i64,
    now: i64,
) -> Vec<AccountRef> {
    for (id, modified, external) in found {
        let slot = suspects.entry(id).or_insert((modified, external.clone(), now));
        (slot.0, slot.1) = (slot.0.max(modified), external);
    }
    let mut out = Vec::new();
    suspects.retain(|id, (modified, external, first)| {
        let Some(a) = accounts.get(id).filter(|a| a.judged_here(external.as_deref())) else { return false };
        if !edited_after(a.confirmed_ms, *modified, grace) {
            return false; // a confirmation read since explains it: Elo's own write
        }
        if now - *first < grace {
            return true;
        }
        out.push(a.clone());
        false
    });
    out
}

/// `SELECT Id FROM Account WHERE Id IN (...)` (Salesforce ids: letters and digits only).
pub fn soql_accounts_by_id(ids: &[String]) -> String {
    let quoted: Vec<String> = ids
        .iter()
        .map(|id| id.chars().filter(char::is_ascii_alphanumeric).collect::<String>())
        .map(|id| format!("'{id}'"))
        .collect();
    format!("SELECT Id FROM Account WHERE Id IN ({})", quoted.join(","))
}

/// `SELECT Id, LastModifiedDate, <external id> FROM Account WHERE LastModifiedDate > <since>
/// ... LIMIT 2000` (the external id: the customer key the Account was created for).
pub fn soql_accounts_modified_since(external_id: &str, since_ms: i64) -> String {
    let at = order_ingest::normalize::format_magento_time(since_ms.max(0)).replace(' ', "T");
    let field: String = external_id.chars().filter(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
    format!(
        "SELECT Id, LastModifiedDate, {field} FROM Account WHERE LastModifiedDate > {at}Z ORDER BY LastModifiedDate ASC LIMIT 2000"
    )
}

impl Sweeps {
    /// Looks up the Accounts of one batch of orders; a gone one is `missing` on the entry last
    /// confirmed with it. `Err` says what cut it short: the budget, or a failed call.
    pub(super) async fn salesforce_accounts_exist<C: CommandSink>(
        &self,
        ledger: &Ledger<C>,
        client: &salesforce_sink::client::SalesforceClient,
        budget: &Budget,
        spent: &mut u64,
        ids: BTreeSet<String>,
        accounts: &HashMap<String, AccountRef>,
    ) -> Result<(), Cut> {
        let ids: Vec<String> = ids.into_iter().collect();
        if ids.is_empty() {
            return Ok(());
        }
        if !budget.spend(spent).await {
            return Err(Cut::Budget);
        }
        let records = match query_charged(client, budget, spent, &soql_accounts_by_id(&ids)).await {
            Ok(Some(r)) => r,
            Ok(None) => return Err(Cut::Budget),
            Err(error) => {
                tracing::warn!(error = %error, "salesforce sweep: account query failed");
                return Err(Cut::Failed);
            }
        };
        for (partition, key) in missing_accounts(&ids, &records, accounts) {
            self.flag_salesforce(ledger, budget, partition, &key, DriftKind::Missing).await;
        }
        Ok(())
    }

    /// The Accounts changed after Elo's confirmed write, from the accounts cursor on. `Err`
    /// says what cut it short: the budget, or a failed call.
    pub(super) async fn salesforce_account_edits<C: CommandSink>(
        &self,
        ledger: &Ledger<C>,
        client: &salesforce_sink::client::SalesforceClient,
        budget: &Budget,
        spent: &mut u64,
        held: &[i32],
    ) -> Result<(), Cut> {
        let grace = self.args.grace.as_millis() as i64;
        let started = now_ms();
        let since = crate::cursor::get(ledger, crate::cursor::SALESFORCE_ACCOUNTS_MODIFIED, self.first_since(started));
        if !budget.spend(spent).await {
            return Err(Cut::Budget);
        }
        let soql = soql_accounts_modified_since(&self.account_external_id, since);
        let records = match query_charged(client, budget, spent, &soql).await {
            Ok(Some(r)) => r,
            Ok(None) => return Err(Cut::Budget),
            Err(error) => {
                tracing::warn!(error = %error, "salesforce sweep: account LastModifiedDate query failed");
                return Err(Cut::Failed);
            }
        };
        let accounts = held_accounts(ledger, held, started);
        let mut last_seen = since;
        let mut found = Vec::new();
        for record in &records {
            let (Some(id), Some(modified)) = (
                record.get("Id").and_then(Value::as_str),
                record.get("LastModifiedDate").and_then(Value::as_str).and_then(parse_sf_datetime),
            ) else {
                continue;
            };
            last_seen = last_seen.max(modified);
            let Some(account) = accounts.get(id) else { continue }; // another replica's, or none of Elo's
            let external = record.get(self.account_external_id.as_str()).and_then(Value::as_str);
            if account.judged_here(external) && edited_after(account.confirmed_ms, modified, grace) {
                found.push((id.to_owned(), modified, external.map(str::to_owned)));
            }
        }
        let confirmed = {
            let mut suspects = self.account_suspects.lock().expect("account suspects");
            confirm_account_edits(&mut suspects, found, &accounts, grace, started)
        };
        for account in confirmed {
            self.flag_salesforce(ledger, budget, account.partition, &account.key, DriftKind::Altered).await;
        }
        budget.checked(records.len() as u64);
        let next = super::salesforce::next_since(records.len(), since, last_seen, started, grace);
        if let Err(error) = crate::cursor::set(ledger, held, crate::cursor::SALESFORCE_ACCOUNTS_MODIFIED, next).await {
            tracing::warn!(error = %error, "salesforce sweep: cannot keep the accounts cursor");
        }
        Ok(())
    }

    /// Records a Salesforce finding on `key`.
    pub(super) async fn flag_salesforce<C: CommandSink>(
        &self,
        ledger: &Ledger<C>,
        budget: &Budget,
        partition: i32,
        key: &str,
        kind: DriftKind,
    ) {
        match ledger.flag(partition, key, "salesforce", kind, 0, || None).await {
            Ok(true) => {
                budget.progress.found.fetch_add(1, Ordering::Relaxed);
            }
            Ok(false) => {}
            Err(error) => tracing::warn!(error = %error, key, "salesforce sweep: cannot record drift"),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use elo_events::OutcomeStatus;
    use serde_json::json;

    use super::*;
    use crate::ledger::tests::{event, outcome};

    fn written(id: &str, account: &str, at: i64) -> (String, Entry) {
        written_by("c:1", id, account, at)
    }

    fn written_by(customer: &str, id: &str, account: &str, at: i64) -> (String, Entry) {
        let mut e = Entry::for_event(&event("order", id, customer, 100));
        e.apply_event(&event("order", id, customer, 100), 0);
        let mut o = outcome("salesforce", "order", id, 100, OutcomeStatus::Applied);
        o.target_ids.insert("Account".into(), account.into());
        e.apply_outcome(&o, at);
        (format!("order:{id}"), e)
    }

    #[test]
    fn an_account_belongs_to_the_entry_last_written_with_it() {
        let entries = vec![written("1", "001A", 10), written("2", "001A", 30), written("3", "001B", 20)];
        let mut out = HashMap::new();
        accounts_in(4, &entries, Duration::from_secs(60), 1_000, &mut out);
        let want = AccountRef {
            partition: 4,
            key: "order:2".into(),
            confirmed_ms: 30,
            settled: true,
            customer_keys: ["c:1".to_owned()].into(),
            named_by: vec![(4, "order:1".into()), (4, "order:2".into())],
        };
        assert_eq!(out["001A"], want);
        assert_eq!(out["001B"].key, "order:3");
        let mut pending = written("4", "001C", 40);
        pending.1.apply_event(&event("order", "4", "c:1", 200), 50);
        accounts_in(4, &[pending], Duration::from_secs(60), 1_000, &mut out);
        assert!(!out["001C"].judged_here(None), "a newer version is on its way: not judged");
    }

    /// The held Accounts of `entries` on partition 4.
    fn held(entries: &[(String, Entry)]) -> HashMap<String, AccountRef> {
        let mut out = HashMap::new();
        accounts_in(4, entries, Duration::from_secs(60), 10_000, &mut out);
        out
    }

    #[test]
    fn an_account_is_rewritten_by_the_entry_confirmed_last_not_the_greatest_key() {
        // "order:99" sorts after "order:100", but order 100 was written (confirmed) later.
        let accounts = held(&[written("100", "001A", 50), written("99", "001A", 20)]);
        assert_eq!(accounts["001A"].key, "order:100");
        let mut suspects = AccountSuspects::new();
        let found = || vec![("001A".to_owned(), 5_000, None)];
        assert!(confirm_account_edits(&mut suspects, found(), &accounts, 1_000, 6_000).is_empty());
        let flagged = confirm_account_edits(&mut suspects, found(), &accounts, 1_000, 7_000);
        assert_eq!(flagged.iter().map(|a| a.key.as_str()).collect::<Vec<_>>(), vec!["order:100"]);
        // Gone: every order pointing at it is rewritten, in one round.
        let mut gone = missing_accounts(&["001A".into()], &[], &accounts);
        gone.sort();
        assert_eq!(gone, vec![(4, "order:100".to_owned()), (4, "order:99".to_owned())]);
        assert!(missing_accounts(&["001A".into()], &[json!({"Id": "001A"})], &accounts).is_empty());
    }

    #[test]
    fn a_gone_account_is_missing_also_on_orders_that_named_no_account() {
        // Order 3's last write was a status change of an older order: the sink wrote no
        // customer data, so its outcome named no Account; it still points at the customer's.
        let mut status_change = written("3", "001A", 40);
        let mut o = outcome("salesforce", "order", "3", 100, OutcomeStatus::Applied);
        o.target_ids.insert("Order".into(), "801C".into());
        status_change.1.apply_outcome(&o, 45);
        assert!(!status_change.1.targets["salesforce"].ids.contains_key("Account"));
        let other_customer = written_by("c:2", "4", "001B", 40);
        let entries = vec![written("1", "001A", 10), status_change, other_customer];
        let mut accounts = held(&entries);
        customers_point_at_accounts(4, &entries, &mut accounts);
        let mut gone = missing_accounts(&["001A".into()], &[], &accounts);
        gone.sort();
        assert_eq!(gone, vec![(4, "order:1".to_owned()), (4, "order:3".to_owned())]);
    }

    #[test]
    fn an_account_elos_own_write_is_changing_is_not_judged() {
        // A returning customer's newer order: the sink upserted the Account with it; its
        // outcome is not read yet.
        let mut newer = written("2", "001A", 20);
        newer.1.apply_event(&event("order", "2", "c:1", 200), 9_000);
        let accounts = held(&[written("1", "001A", 10), newer]);
        assert!(missing_accounts(&["001A".into()], &[], &accounts).is_empty(), "not missing");
        let mut suspects = AccountSuspects::new();
        let found = vec![("001A".to_owned(), 9_500, None)];
        assert!(confirm_account_edits(&mut suspects, found, &accounts, 5, 10_000).is_empty());
        assert!(suspects.is_empty(), "not even a suspect");
    }

    #[test]
    fn an_account_edit_counts_on_the_second_round_unless_a_confirmation_explains_it() {
        let (grace, edited) = (1_000, 5_000);
        let before = held(&[written("1", "001A", 100)]);
        let found = || vec![("001A".to_owned(), edited, Some("c:1".to_owned()))];
        let mut suspects = AccountSuspects::new();
        assert!(confirm_account_edits(&mut suspects, found(), &before, grace, 6_000).is_empty(), "first round");
        // Read meanwhile: Elo's write of order 2 (same Account), confirmed after the edit.
        let explained = held(&[written("1", "001A", 100), written("2", "001A", 5_200)]);
        assert!(confirm_account_edits(&mut suspects, vec![], &explained, grace, 7_000).is_empty());
        assert!(suspects.is_empty(), "explained: dropped");
        // Unexplained: flagged on the round a grace later (the cursor has moved: not found again).
        assert!(confirm_account_edits(&mut suspects, found(), &before, grace, 6_000).is_empty());
        let flagged = confirm_account_edits(&mut suspects, vec![], &before, grace, 7_000);
        assert_eq!(flagged.iter().map(|a| a.key.as_str()).collect::<Vec<_>>(), vec!["order:1"]);
        assert!(suspects.is_empty());
    }

    #[test]
    fn an_account_written_through_an_alias_is_judged_by_its_owners_replica_only() {
        // g:9 is an alias of c:1 (one person, one Account created for c:1): the replica holding
        // g:9's partition leaves it alone, so the two never take turns rewriting it.
        let alias_side = held(&[written_by("g:9", "5", "001A", 100)]);
        let mut suspects = AccountSuspects::new();
        for now in [6_000, 7_000, 8_000] {
            let found = vec![("001A".to_owned(), 5_000, Some("c:1".to_owned()))];
            assert!(confirm_account_edits(&mut suspects, found, &alias_side, 1_000, now).is_empty());
        }
        let owner_side = held(&[written_by("c:1", "1", "001A", 100)]);
        let found = vec![("001A".to_owned(), 5_000, Some("c:1".to_owned()))];
        assert!(confirm_account_edits(&mut suspects, found, &owner_side, 1_000, 6_000).is_empty());
        assert_eq!(confirm_account_edits(&mut suspects, vec![], &owner_side, 1_000, 7_000).len(), 1);
    }

    #[test]
    fn account_queries_quote_only_ids() {
        assert_eq!(
            soql_accounts_by_id(&["001A".into(), "001'x".into()]),
            "SELECT Id FROM Account WHERE Id IN ('001A','001x')"
        );
        assert_eq!(
            soql_accounts_modified_since("Elo_Id__c", 1_793_491_200_000),
            "SELECT Id, LastModifiedDate, Elo_Id__c FROM Account WHERE LastModifiedDate > 2026-11-01T00:00:00Z ORDER BY LastModifiedDate ASC LIMIT 2000"
        );
    }
}
