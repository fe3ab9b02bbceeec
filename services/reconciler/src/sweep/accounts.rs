//! The Salesforce sweep's Accounts: the Accounts the sink's confirmed writes named (its outcomes
//! carry the `Account` id) are looked up by `Id` with the orders they belong to (one query per
//! batch of orders), and changed by `LastModifiedDate` after Elo's confirmed write. A deleted or
//! edited Account is drift of the newest order (or customer) written with it: its `RESEND`
//! rewrites the Account with it (the sink upserts the Account by external id in the same graph).

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::Ordering;

use serde_json::Value;

use super::salesforce::{edited_after, missing_ids, parse_sf_datetime, query_charged};
use super::{Budget, Sweeps};
use crate::ledger::{DriftKind, Entry, Health};
use crate::store::{CommandSink, Ledger, now_ms};

/// What the ledger knows of one Salesforce Account: the entry written with it most recently.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccountRef {
    pub partition: i32,
    pub key: String,
    /// When that write was confirmed (Unix ms).
    pub confirmed_ms: i64,
}

/// The Accounts of `entries` (confirmed by Salesforce, health `Confirmed`), by Salesforce id.
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
        if entry.is_mark() || entry.health("salesforce", sla, now) != Health::Confirmed {
            continue;
        }
        let slot = out.entry(account.clone()).or_insert_with(|| AccountRef {
            partition,
            key: key.clone(),
            confirmed_ms: t.at_ms,
        });
        if t.at_ms > slot.confirmed_ms {
            *slot = AccountRef { partition, key: key.clone(), confirmed_ms: t.at_ms };
        }
    }
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

/// `SELECT Id, LastModifiedDate FROM Account WHERE LastModifiedDate > <since> ... LIMIT 2000`.
pub fn soql_accounts_modified_since(since_ms: i64) -> String {
    let at = order_ingest::normalize::format_magento_time(since_ms.max(0)).replace(' ', "T");
    format!(
        "SELECT Id, LastModifiedDate FROM Account WHERE LastModifiedDate > {at}Z ORDER BY LastModifiedDate ASC LIMIT 2000"
    )
}

impl Sweeps {
    /// Looks up the Accounts of one batch of orders (`(key, partition, account id)`); a gone
    /// one is `missing` on the order written with it. False when the budget or an error cut
    /// it short.
    pub(super) async fn salesforce_accounts_exist<C: CommandSink>(
        &self,
        ledger: &Ledger<C>,
        client: &salesforce_sink::client::SalesforceClient,
        budget: &Budget,
        spent: &mut u64,
        orders: &[(String, i32, String)],
    ) -> bool {
        let ids: Vec<String> = orders.iter().map(|(.., a)| a.clone()).collect::<BTreeSet<_>>().into_iter().collect();
        if ids.is_empty() {
            return true;
        }
        if !budget.spend(spent).await {
            return false;
        }
        let records = match query_charged(client, budget, spent, &soql_accounts_by_id(&ids)).await {
            Ok(Some(r)) => r,
            Ok(None) => return false,
            Err(error) => {
                tracing::warn!(error = %error, "salesforce sweep: account query failed");
                return false;
            }
        };
        for account in missing_ids(&ids, &records, "Id") {
            // The newest order written with it: its rewrite brings the Account back.
            let Some((key, partition, _)) = orders.iter().rev().find(|(.., a)| *a == account) else { continue };
            self.flag_salesforce(ledger, budget, *partition, key, DriftKind::Missing).await;
        }
        true
    }

    /// The Accounts changed after Elo's confirmed write, from the accounts cursor on. False
    /// when the budget or an error cut it short.
    pub(super) async fn salesforce_account_edits<C: CommandSink>(
        &self,
        ledger: &Ledger<C>,
        client: &salesforce_sink::client::SalesforceClient,
        budget: &Budget,
        spent: &mut u64,
        held: &[i32],
    ) -> bool {
        let grace = self.args.grace.as_millis() as i64;
        let started = now_ms();
        let sla = ledger.policy.targets.iter().find(|t| t.name == "salesforce").map(|t| t.sla).unwrap_or_default();
        let since = crate::cursor::get(ledger, crate::cursor::SALESFORCE_ACCOUNTS_MODIFIED)
            .unwrap_or(started - self.args.salesforce_interval.as_millis() as i64 - grace);
        if !budget.spend(spent).await {
            return false;
        }
        let records = match query_charged(client, budget, spent, &soql_accounts_modified_since(since)).await {
            Ok(Some(r)) => r,
            Ok(None) => return false,
            Err(error) => {
                tracing::warn!(error = %error, "salesforce sweep: account LastModifiedDate query failed");
                return false;
            }
        };
        let mut accounts = HashMap::new();
        for &partition in held {
            accounts_in(partition, &ledger.store.entries(partition), sla, started, &mut accounts);
        }
        let mut last_seen = since;
        for record in &records {
            let (Some(id), Some(modified)) = (
                record.get("Id").and_then(Value::as_str),
                record.get("LastModifiedDate").and_then(Value::as_str).and_then(parse_sf_datetime),
            ) else {
                continue;
            };
            last_seen = last_seen.max(modified);
            let Some(account) = accounts.get(id) else { continue }; // another replica's, or none of Elo's
            if edited_after(account.confirmed_ms, modified, grace) {
                self.flag_salesforce(ledger, budget, account.partition, &account.key, DriftKind::Altered).await;
            }
        }
        budget.checked(records.len() as u64);
        let next = super::salesforce::next_since(records.len(), since, last_seen, started, grace);
        if let Err(error) = crate::cursor::set(ledger, held, crate::cursor::SALESFORCE_ACCOUNTS_MODIFIED, next).await {
            tracing::warn!(error = %error, "salesforce sweep: cannot keep the accounts cursor");
        }
        true
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

    use super::*;
    use crate::ledger::tests::{event, outcome};

    fn written(id: &str, account: &str, at: i64) -> (String, Entry) {
        let mut e = Entry::for_event(&event("order", id, "c:1", 100));
        e.apply_event(&event("order", id, "c:1", 100), 0);
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
        assert_eq!(out["001A"], AccountRef { partition: 4, key: "order:2".into(), confirmed_ms: 30 });
        assert_eq!(out["001B"].key, "order:3");
        let mut pending = written("4", "001C", 40);
        pending.1.apply_event(&event("order", "4", "c:1", 200), 50);
        accounts_in(4, &[pending], Duration::from_secs(60), 1_000, &mut out);
        assert!(!out.contains_key("001C"), "a newer version is on its way: not judged");
    }

    #[test]
    fn account_queries_quote_only_ids() {
        assert_eq!(
            soql_accounts_by_id(&["001A".into(), "001'x".into()]),
            "SELECT Id FROM Account WHERE Id IN ('001A','001x')"
        );
        assert_eq!(
            soql_accounts_modified_since(1_793_491_200_000),
            "SELECT Id, LastModifiedDate FROM Account WHERE LastModifiedDate > 2026-11-01T00:00:00Z ORDER BY LastModifiedDate ASC LIMIT 2000"
        );
    }
}
