//! A guest who registers later (or the reverse) gets a second customer key with the same
//! e-mail; the org's duplicate rule refuses a second Contact (`DUPLICATES_DETECTED`). Instead of
//! parking that person's orders, the sink looks the e-mail up (one query for the batch, only
//! when the rule fired), and when the existing Contact (or Person Account) carries another Elo
//! key, remembers the new key as an alias of it (in the state store) and writes the records to
//! the existing Account and Contact. Later events of the new key go there directly, at no extra
//! call. A Contact without an Elo key (someone else's data) is not taken over: those records
//! stay refused.

use elo_events::{CommerceEvent, CommerceEventType};
use elo_kafka::ErrorClass;

use super::{Confirmed, Sink, Verdict, customer_entity};
use crate::graph::Work;
use crate::mapping::AccountMode;

impl Sink {
    /// `e` written under its alias, if its key has one.
    pub(super) fn aliased(&self, partition: i32, e: &CommerceEvent) -> Option<CommerceEvent> {
        if e.event_type == CommerceEventType::CustomerErased {
            // Erasure finds the records through the ids kept for the key itself.
            return None;
        }
        let alias = self.confirmed.get(partition, &customer_entity(e))?.alias?;
        let mut e = e.clone();
        e.customer_key = alias;
        Some(e)
    }

    /// For records refused by the duplicate rule: their events under the key of the existing
    /// person with the same e-mail (the alias stored), if there is one.
    pub(super) async fn match_by_email(
        &self,
        partition: i32,
        work: &[Work<'_>],
        verdicts: &[Option<Verdict>],
    ) -> Vec<(usize, CommerceEvent)> {
        let refused: Vec<&Work<'_>> = work
            .iter()
            .filter(|w| {
                verdicts[w.index]
                    .as_ref()
                    .and_then(|v| v.result.as_ref().err())
                    .is_some_and(|e| e.class == ErrorClass::Permanent && e.code == "DUPLICATES_DETECTED")
            })
            .collect();
        // E-mails with quotes or backslashes are not put into SOQL: those records stay refused.
        let email = |w: &Work<'_>| {
            w.event.customer.as_ref().map(|c| c.email.clone()).filter(|m| !m.contains(['\'', '\\']) && !m.is_empty())
        };
        let mut emails: Vec<String> = refused.iter().filter_map(|w| email(w)).collect();
        emails.sort();
        emails.dedup();
        if emails.is_empty() {
            return Vec::new();
        }
        let list = emails.iter().map(|m| format!("'{m}'")).collect::<Vec<_>>().join(",");
        let soql = match self.mapping.mode {
            AccountMode::Business => format!(
                "SELECT Id, AccountId, Email, {} FROM Contact WHERE Email IN ({list})",
                self.mapping.ids.contact
            ),
            AccountMode::Person => format!(
                "SELECT Id, PersonEmail, {} FROM Account WHERE PersonEmail IN ({list})",
                self.mapping.ids.account
            ),
        };
        let rows = match self.client.query(&soql).await {
            Ok(rows) => rows,
            Err(e) => {
                // The records stay refused (DLQ): the lookup is a best effort on the error path.
                tracing::warn!(error_code = %e.code(), "e-mail lookup for duplicate customers failed");
                return Vec::new();
            }
        };
        let (email_field, key_field) = match self.mapping.mode {
            AccountMode::Business => ("Email", self.mapping.ids.contact.as_str()),
            AccountMode::Person => ("PersonEmail", self.mapping.ids.account.as_str()),
        };
        let mut out = Vec::new();
        for w in refused {
            let Some(mail) = email(w) else { continue };
            let Some(row) =
                rows.iter().find(|r| r[email_field].as_str().is_some_and(|m| m.eq_ignore_ascii_case(&mail)))
            else {
                continue;
            };
            let Some(other) = row[key_field].as_str().filter(|k| *k != w.event.customer_key) else { continue };
            let mut known = Confirmed { alias: Some(other.to_owned()), ..Confirmed::default() };
            let id = row["Id"].as_str().unwrap_or_default().to_owned();
            match self.mapping.mode {
                AccountMode::Business => {
                    known.target_ids.insert("Contact".into(), id);
                    if let Some(account) = row["AccountId"].as_str() {
                        known.target_ids.insert("Account".into(), account.to_owned());
                    }
                }
                AccountMode::Person => {
                    known.target_ids.insert("Account".into(), id);
                }
            }
            if let Err(e) = self.confirmed.put(partition, &customer_entity(w.event), known).await {
                tracing::warn!(error = %e, "alias not stored; the records stay refused");
                continue;
            }
            tracing::info!(alias = other, "a second customer key for an existing person: written to its records");
            let mut event = w.event.clone();
            event.customer_key = other.to_owned();
            out.push((w.index, event));
        }
        out
    }
}
