//! The Salesforce sweep: confirmed orders by external id (gone: `missing`) with their
//! Accounts by id, then orders and Accounts changed after Elo's confirmed write by
//! `LastModifiedDate` (`altered`); see also [`super::accounts`].

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;

use reqwest::Method;
use serde_json::Value;

use super::{Budget, Sweeps};
use crate::ledger::{DriftKind, Health};
use crate::store::{CommandSink, Ledger, now_ms};

/// `SELECT <field> FROM Order WHERE <field> IN ('o:1','o:2')` (ids are Elo's own, quoted).
pub fn soql_by_external_ids(field: &str, ids: &[String]) -> String {
    let quoted: Vec<String> =
        ids.iter().map(|id| format!("'{}'", id.replace('\\', "\\\\").replace('\'', "\\'"))).collect();
    format!("SELECT {field} FROM Order WHERE {field} IN ({})", quoted.join(","))
}

/// The asked ids a query result lacks.
pub fn missing_ids(asked: &[String], records: &[Value], field: &str) -> Vec<String> {
    let found: BTreeSet<&str> = records.iter().filter_map(|r| r.get(field).and_then(Value::as_str)).collect();
    asked.iter().filter(|id| !found.contains(id.as_str())).cloned().collect()
}

/// `SELECT <field>, LastModifiedDate FROM Order WHERE LastModifiedDate > <since> LIMIT 2000`:
/// orders someone changed since the last round (one call: 2000 is a query page).
pub fn soql_modified_since(field: &str, since_ms: i64) -> String {
    let at = order_ingest::normalize::format_magento_time(since_ms.max(0)).replace(' ', "T");
    format!(
        "SELECT {field}, LastModifiedDate FROM Order WHERE LastModifiedDate > {at}Z ORDER BY LastModifiedDate ASC LIMIT 2000"
    )
}

/// Salesforce's `2026-11-30T08:00:00.000+0000` (UTC), to the second.
pub fn parse_sf_datetime(text: &str) -> Option<i64> {
    order_ingest::normalize::parse_magento_time(text.get(..19)?)
}

/// Whether Salesforce changed a record after Elo's write was confirmed (`confirmed_ms`, when
/// the outcome was read, later than the write itself) by more than `grace_ms`: someone else
/// edited it.
pub fn edited_after(confirmed_ms: i64, last_modified_ms: i64, grace_ms: i64) -> bool {
    last_modified_ms > confirmed_ms + grace_ms
}

/// The external id the salesforce-sink gives an order.
pub fn order_external_id(entity_id: &str) -> String {
    format!("o:{entity_id}")
}

impl Sweeps {
    /// Where a `LastModifiedDate` pass starts for a partition never swept: one interval (and
    /// the grace) back.
    pub(super) fn first_since(&self, started: i64) -> i64 {
        started - self.args.salesforce_interval.as_millis() as i64 - self.args.grace.as_millis() as i64
    }

    /// One Salesforce round over the confirmed orders after `cursor` (a ledger key); returns
    /// where the next round starts (empty: from the beginning).
    pub async fn salesforce_round<C: CommandSink>(&self, ledger: &Ledger<C>, cursor: String) -> String {
        let Some((client, budget)) = self.salesforce.as_ref() else { return String::new() };
        if !budget.set_share(ledger.held_count(), self.partitions) {
            return cursor; // nothing held here
        }
        let field = &self.args.salesforce_order_field;
        let now = now_ms();
        let grace = self.args.grace.as_millis() as i64;
        let sla = ledger.policy.targets.iter().find(|t| t.name == "salesforce").map(|t| t.sla).unwrap_or_default();
        // (key, partition, external id, Account id) of every order Salesforce confirmed a while ago.
        let mut orders: Vec<(String, i32, String, Option<String>)> = Vec::new();
        let accounts = super::accounts::held_accounts(ledger, &ledger.partitions(), now);
        for partition in ledger.partitions() {
            for (key, entry) in ledger.store.entries(partition) {
                let confirmed_at = entry.targets.get("salesforce").map_or(i64::MAX, |t| t.at_ms);
                if entry.kind == "order"
                    && entry.health("salesforce", sla, now) == Health::Confirmed
                    && now - confirmed_at > grace
                {
                    let account = entry.targets.get("salesforce").and_then(|t| t.ids.get("Account")).cloned();
                    orders.push((key, partition, order_external_id(&entry.entity_id), account));
                }
            }
        }
        orders.sort();
        let start = orders.partition_point(|(k, ..)| k.as_str() <= cursor.as_str());
        let mut spent = 0;
        let mut next = String::new();
        for chunk in orders[start..].chunks(200) {
            if !budget.spend(&mut spent).await {
                budget.round("partial");
                return next;
            }
            let ids: Vec<String> = chunk.iter().map(|(_, _, id, _)| id.clone()).collect();
            let records = match query_charged(client, budget, &mut spent, &soql_by_external_ids(field, &ids)).await {
                Ok(Some(r)) => r,
                Ok(None) => {
                    budget.round("partial"); // a partial answer would read as missing orders
                    return next;
                }
                Err(error) => {
                    tracing::warn!(error = %error, "salesforce sweep: query failed; next round resumes here");
                    budget.round("failed");
                    return next;
                }
            };
            budget.checked(chunk.len() as u64);
            let missing: BTreeSet<String> = missing_ids(&ids, &records, field).into_iter().collect();
            for (key, partition, id, _) in chunk {
                if !missing.contains(id) {
                    continue;
                }
                match ledger.flag(*partition, key, "salesforce", DriftKind::Missing, 0, || None).await {
                    Ok(true) => {
                        budget.progress.found.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(false) => {}
                    Err(error) => tracing::warn!(error = %error, key, "salesforce sweep: cannot record drift"),
                }
            }
            // The Accounts of the orders still there (a gone order is rewritten with its Account).
            let ids: BTreeSet<String> = chunk
                .iter()
                .filter(|(_, _, id, _)| !missing.contains(id))
                .filter_map(|(.., account)| account.clone())
                .collect();
            if let Err(cut) = self.salesforce_accounts_exist(ledger, client, budget, &mut spent, ids, &accounts).await {
                budget.round(cut.result());
                return next;
            }
            next.clone_from(&chunk[chunk.len() - 1].0);
        }
        if !self.salesforce_edits(ledger, client, budget, &mut spent).await {
            return next;
        }
        budget.round("complete");
        String::new()
    }

    /// The `LastModifiedDate` pass: orders changed in Salesforce after Elo's confirmed write
    /// are `altered`. Returns false when the budget or an error cut it short (it resumes from
    /// the same point next round).
    async fn salesforce_edits<C: CommandSink>(
        &self,
        ledger: &Ledger<C>,
        client: &salesforce_sink::client::SalesforceClient,
        budget: &Budget,
        spent: &mut u64,
    ) -> bool {
        let field = &self.args.salesforce_order_field;
        let grace = self.args.grace.as_millis() as i64;
        let started = now_ms();
        let sla = ledger.policy.targets.iter().find(|t| t.name == "salesforce").map(|t| t.sla).unwrap_or_default();
        let held = ledger.partitions();
        if held.is_empty() {
            return true; // nothing of ours to judge: the cursors stay where they are
        }
        // Where the held partitions' last pass stopped (kept in the ledger: a restart or a
        // failover resumes there); the first pass ever looks one interval back.
        let since = crate::cursor::get(ledger, crate::cursor::SALESFORCE_MODIFIED, self.first_since(started));
        if !budget.spend(spent).await {
            budget.round("partial");
            return false;
        }
        let records = match query_charged(client, budget, spent, &soql_modified_since(field, since)).await {
            Ok(Some(r)) => r,
            Ok(None) => {
                budget.round("partial");
                return false;
            }
            Err(error) => {
                tracing::warn!(error = %error, "salesforce sweep: LastModifiedDate query failed");
                budget.round("failed");
                return false;
            }
        };
        let mut last_seen = since;
        for record in &records {
            let (Some(external), Some(modified)) = (
                record.get(field).and_then(Value::as_str),
                record.get("LastModifiedDate").and_then(Value::as_str).and_then(parse_sf_datetime),
            ) else {
                continue;
            };
            last_seen = last_seen.max(modified);
            let Some(id) = external.strip_prefix("o:") else { continue };
            let key = crate::ledger::key("order", id);
            let Some((partition, entry)) =
                ledger.partitions().into_iter().find_map(|p| ledger.store.get(p, &key).map(|e| (p, e)))
            else {
                continue; // another replica's, or not in the ledger
            };
            // Only a record whose latest version Salesforce confirmed: a newer version the sink
            // is writing now is not an edit.
            let Some(confirmed) = entry.targets.get("salesforce") else { continue };
            if entry.health("salesforce", sla, started) != Health::Confirmed
                || !edited_after(confirmed.at_ms, modified, grace)
            {
                continue;
            }
            match ledger.flag(partition, &key, "salesforce", DriftKind::Altered, 0, || None).await {
                Ok(true) => {
                    budget.progress.found.fetch_add(1, Ordering::Relaxed);
                }
                Ok(false) => {}
                Err(error) => tracing::warn!(error = %error, key, "salesforce sweep: cannot record drift"),
            }
        }
        budget.checked(records.len() as u64);
        let next = next_since(records.len(), since, last_seen, started, grace);
        if let Err(error) = crate::cursor::set(ledger, &held, crate::cursor::SALESFORCE_MODIFIED, next).await {
            tracing::warn!(error = %error, "salesforce sweep: cannot keep the LastModifiedDate cursor; the next pass reads again from the last one kept");
        }
        if let Err(cut) = self.salesforce_account_edits(ledger, client, budget, spent, &held).await {
            budget.round(cut.result());
            return false;
        }
        true
    }
}

/// Where the next `LastModifiedDate` pass starts. A full page may hold more: go on from the
/// second *before* its last change (the query is strict `>` at one-second precision, so
/// same-second records past the page are read again rather than skipped; findings are
/// idempotent), unless that makes no progress (a page all within one second); otherwise
/// from this round's start minus the grace (clock skew).
pub(super) fn next_since(records: usize, since: i64, last_seen: i64, started: i64, grace: i64) -> i64 {
    match records >= 2000 {
        true if last_seen - 1_000 > since => last_seen - 1_000,
        true => last_seen,
        false => started - grace,
    }
}

/// Runs a SOQL query page by page (`nextRecordsUrl`), every page after the first (which the
/// caller paid) paid from the round's budget. `Ok(None)`: the budget ran out mid-query (a
/// partial answer would read as missing records).
pub(super) async fn query_charged(
    client: &salesforce_sink::client::SalesforceClient,
    budget: &Budget,
    spent: &mut u64,
    soql: &str,
) -> Result<Option<Vec<Value>>, salesforce_sink::client::Error> {
    let path = format!("/query?q={}", soql_encode(soql));
    let mut page = client.call("query", Method::GET, &path, None).await?;
    let mut out = Vec::new();
    loop {
        // No `records` is not an empty result: read as one, every id asked for would be missing.
        let Some(records) = page["records"].as_array() else {
            return Err(salesforce_sink::client::Error::Decode("a query answer without records".into()));
        };
        out.extend(records.iter().cloned());
        let Some(next) = page["nextRecordsUrl"].as_str() else { return Ok(Some(out)) };
        if !budget.spend(spent).await {
            return Ok(None);
        }
        let prefix = format!("/services/data/{}", client.api_version());
        let path = next.strip_prefix(&prefix).unwrap_or(next).to_owned();
        page = client.call("query", Method::GET, &path, None).await?;
    }
}

/// A SOQL statement as a query-string value.
fn soql_encode(soql: &str) -> String {
    soql.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            b' ' => "+".into(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn salesforce_lookups_find_the_missing_ids() {
        let ids = vec!["o:1".to_owned(), "o:2".to_owned(), "o:3".to_owned()];
        assert_eq!(
            soql_by_external_ids("Elo_Id__c", &ids),
            "SELECT Elo_Id__c FROM Order WHERE Elo_Id__c IN ('o:1','o:2','o:3')"
        );
        assert_eq!(soql_by_external_ids("F", &["o:'x".to_owned()]), "SELECT F FROM Order WHERE F IN ('o:\\'x')");
        let found = vec![json!({"Elo_Id__c": "o:1"}), json!({"Elo_Id__c": "o:3", "attributes": {}})];
        assert_eq!(missing_ids(&ids, &found, "Elo_Id__c"), vec!["o:2".to_owned()]);
        assert!(
            missing_ids(
                &ids,
                &[json!({"Elo_Id__c": "o:1"}), json!({"Elo_Id__c": "o:2"}), json!({"Elo_Id__c": "o:3"})],
                "Elo_Id__c"
            )
            .is_empty()
        );
    }

    #[test]
    fn salesforce_edits_are_changes_after_the_confirmed_write() {
        assert_eq!(
            soql_modified_since("Elo_Id__c", 1_793_491_200_000),
            "SELECT Elo_Id__c, LastModifiedDate FROM Order WHERE LastModifiedDate > 2026-11-01T00:00:00Z ORDER BY LastModifiedDate ASC LIMIT 2000"
        );
        assert_eq!(parse_sf_datetime("2026-11-01T00:00:05.123+0000"), Some(1_793_491_205_000));
        assert_eq!(parse_sf_datetime("soon"), None);
        assert!(!edited_after(10_000, 12_000, 5_000), "Elo's own write, confirmed a moment later");
        assert!(edited_after(10_000, 20_000, 5_000));
    }

    #[test]
    fn a_full_page_resumes_within_its_last_second() {
        assert_eq!(
            next_since(2000, 0, 50_000, 90_000, 5_000),
            49_000,
            "same-second records past the page are read again"
        );
        assert_eq!(next_since(2000, 49_500, 50_000, 90_000, 5_000), 50_000, "a page within one second moves on");
        assert_eq!(next_since(10, 0, 50_000, 90_000, 5_000), 85_000);
    }

    /// A 2xx query answer without a `records` array is not "no records": read as an empty
    /// result it would make every order of the batch `missing` and repair all of them.
    #[tokio::test]
    async fn a_query_answer_without_records_is_an_error_not_an_empty_result() {
        use axum::routing::{get, post};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let instance = url.clone();
        let app = axum::Router::new()
            .route(
                "/services/oauth2/token",
                post(move || {
                    let instance = instance.clone();
                    async move { axum::Json(json!({"access_token": "t", "instance_url": instance})) }
                }),
            )
            .route("/services/data/v62.0/query", get(|| async { axum::Json(json!({"done": true})) }));
        tokio::spawn(async move { axum::serve(listener, app).await });
        let client = salesforce_sink::client::SalesforceClient::new(salesforce_sink::client::ClientConfig {
            login_url: url,
            api_version: "v62.0".into(),
            auth: salesforce_sink::client::AuthFlow::ClientCredentials {
                client_id: "id".into(),
                client_secret: "secret".into(),
            },
            request_timeout: std::time::Duration::from_secs(5),
            max_concurrent: 1,
            quota_reserve_percent: 0,
            quota_warn_hours: 0.0,
            quota_probe_every: std::time::Duration::from_secs(60),
        })
        .unwrap();
        let budget = Budget::new("salesforce", std::num::NonZeroU32::new(600).unwrap(), 10);
        let mut spent = 1;
        let answer = query_charged(&client, &budget, &mut spent, "SELECT Id FROM Order").await;
        assert!(matches!(answer, Err(salesforce_sink::client::Error::Decode(_))), "got {answer:?}");
    }
}
