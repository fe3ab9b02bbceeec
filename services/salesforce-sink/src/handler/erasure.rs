//! `CUSTOMER_ERASED`: the person's Account and Contact anonymised (default) or, with
//! `"erasure": "delete"`, their Orders, Contact and Account deleted. The records are found
//! through the key → Salesforce id mapping the sink keeps in its state (by external id when
//! the state has none, e.g. records written before the state existed).

use std::collections::BTreeMap;

use elo_events::CommerceEvent;
use elo_kafka::HandlerError;
use reqwest::Method;
use serde_json::{Value, json};

use super::{Confirmed, Sink, classify, customer_entity, from_client, item_error};
use crate::client;
use crate::mapping::{AccountMode, ErasureMode};

/// Composite's limit of subrequests per call.
const COMPOSITE_MAX: usize = 25;

impl Sink {
    /// Erases the person of `e.customer_key`; returns the ids it changed or deleted. Afterwards
    /// no event older than the erasure may write the person's data again.
    pub(super) async fn erase(
        &self,
        partition: i32,
        e: &CommerceEvent,
    ) -> Result<BTreeMap<String, String>, HandlerError> {
        // Customer keys are `c:<digits>` or `g:<hex>`; anything else is refused, not quoted.
        let key = &e.customer_key;
        if !key.chars().all(|c| c.is_ascii_alphanumeric() || c == ':') {
            return Err(HandlerError::permanent("unmappable", "customer key with unexpected characters"));
        }
        let entity = customer_entity(e);
        let known = self.confirmed.get(partition, &entity).unwrap_or_default();
        let (accounts, contacts) = self.person_ids(key, &known).await?;
        let changed = match self.mapping.erasure {
            ErasureMode::Anonymise => self.anonymise(&accounts, &contacts).await?,
            ErasureMode::Delete => self.delete(&accounts, &contacts).await?,
        };
        let mut after = known.clone();
        // What Salesforce holds is no longer that data: the next write writes it in full.
        (after.digest, after.digest_at) = (0, 0);
        // Nothing older than the erasure (any enrichment) may write this person's data again.
        if (e.source_version.updated_at, u8::MAX) > after.at() {
            (after.version, after.rank) = (e.source_version.updated_at, u8::MAX);
        }
        if self.mapping.erasure == ErasureMode::Delete {
            after.target_ids.clear();
        }
        if after != known {
            self.confirmed
                .put(partition, &entity, after)
                .await
                .map_err(|err| HandlerError::transient("state_write", err.to_string()))?;
        }
        Ok(changed)
    }

    /// The person's Account and Contact ids: from the state, else by external id.
    async fn person_ids(&self, key: &str, known: &Confirmed) -> Result<(Vec<String>, Vec<String>), HandlerError> {
        let business = self.mapping.mode == AccountMode::Business;
        let from_state = |object: &str| known.target_ids.get(object).cloned().into_iter().collect::<Vec<_>>();
        let (accounts, contacts) = (from_state("Account"), from_state("Contact"));
        if !accounts.is_empty() && (!business || !contacts.is_empty()) {
            return Ok((accounts, contacts));
        }
        let ids = &self.mapping.ids;
        let fail = |err: client::Error| from_client(&err, self.quota_pause);
        let id_list = |rows: Vec<Value>| rows.iter().filter_map(|r| r["Id"].as_str().map(str::to_owned)).collect();
        let accounts = self
            .client
            .query(&format!("SELECT Id FROM Account WHERE {} = '{key}'", ids.account))
            .await
            .map_err(fail)?;
        let contacts = if business {
            self.client.query(&format!("SELECT Id FROM Contact WHERE {} = '{key}'", ids.contact)).await.map_err(fail)?
        } else {
            Vec::new()
        };
        Ok((id_list(accounts), id_list(contacts)))
    }

    /// Names become "Erased", e-mail and phone cleared; orders stay (the business's records).
    async fn anonymise(
        &self,
        accounts: &[String],
        contacts: &[String],
    ) -> Result<BTreeMap<String, String>, HandlerError> {
        let version = self.client.api_version().to_owned();
        let mut requests = Vec::new();
        let mut changed = BTreeMap::new();
        for id in accounts {
            let body = match self.mapping.mode {
                AccountMode::Business => json!({"Name": "Erased customer", "Phone": null}),
                AccountMode::Person => {
                    json!({"FirstName": null, "LastName": "Erased", "PersonEmail": null, "Phone": null})
                }
            };
            requests.push(json!({"method": "PATCH", "url": format!("/services/data/{version}/sobjects/Account/{id}"), "referenceId": format!("a{}", requests.len()), "body": body}));
            changed.insert("Account".to_owned(), id.clone());
        }
        for id in contacts {
            let body =
                json!({"FirstName": null, "LastName": "Erased", "Email": null, "Phone": null, "MobilePhone": null});
            requests.push(json!({"method": "PATCH", "url": format!("/services/data/{version}/sobjects/Contact/{id}"), "referenceId": format!("c{}", requests.len()), "body": body}));
            changed.insert("Contact".to_owned(), id.clone());
        }
        self.composite(requests, false).await?;
        Ok(changed)
    }

    /// Deletes the person's Orders (activated ones put back to Draft first: Salesforce refuses
    /// to delete an activated order; items go with their order), then Contact and Account.
    /// Records already gone count as deleted, so a retried erasure finishes the job.
    async fn delete(&self, accounts: &[String], contacts: &[String]) -> Result<BTreeMap<String, String>, HandlerError> {
        let version = self.client.api_version().to_owned();
        let url = |object: &str, id: &str| format!("/services/data/{version}/sobjects/{object}/{id}");
        let mut changed = BTreeMap::new();
        for account in accounts {
            let fail = |err: client::Error| from_client(&err, self.quota_pause);
            let orders = self
                .client
                .query(&format!("SELECT Id, Status FROM Order WHERE AccountId = '{account}'"))
                .await
                .map_err(fail)?;
            let mut requests = Vec::new();
            for order in &orders {
                let id = order["Id"].as_str().unwrap_or_default();
                if order["Status"] == "Activated" {
                    requests.push(json!({"method": "PATCH", "url": url("Order", id), "referenceId": format!("d{}", requests.len()), "body": {"Status": "Draft"}}));
                }
            }
            for order in &orders {
                let id = order["Id"].as_str().unwrap_or_default();
                requests.push(
                    json!({"method": "DELETE", "url": url("Order", id), "referenceId": format!("x{}", requests.len())}),
                );
            }
            // Drafts before deletes: chunks keep that order, each chunk all-or-none.
            for chunk in requests.chunks(COMPOSITE_MAX) {
                self.composite(chunk.to_vec(), true).await?;
            }
        }
        let mut requests = Vec::new();
        for id in contacts {
            requests.push(
                json!({"method": "DELETE", "url": url("Contact", id), "referenceId": format!("c{}", requests.len())}),
            );
            changed.insert("Contact".to_owned(), id.clone());
        }
        for id in accounts {
            requests.push(
                json!({"method": "DELETE", "url": url("Account", id), "referenceId": format!("a{}", requests.len())}),
            );
            changed.insert("Account".to_owned(), id.clone());
        }
        for chunk in requests.chunks(COMPOSITE_MAX) {
            self.composite(chunk.to_vec(), true).await?;
        }
        Ok(changed)
    }

    /// One all-or-none Composite call; `gone_is_ok`: a 404 (already deleted) is no error.
    async fn composite(&self, requests: Vec<Value>, gone_is_ok: bool) -> Result<(), HandlerError> {
        if requests.is_empty() {
            return Ok(());
        }
        let body = json!({"allOrNone": true, "compositeRequest": requests});
        let response = self
            .client
            .call("composite", Method::POST, "/composite", Some(&body))
            .await
            .map_err(|err| from_client(&err, self.quota_pause))?;
        let items = response["compositeResponse"].as_array().cloned().unwrap_or_default();
        let errors: Vec<_> = items.iter().filter_map(item_error).filter(|e| e.1 != "PROCESSING_HALTED").collect();
        let real = errors.iter().find(|e| !(gone_is_ok && (e.0 == 404 || e.1 == "ENTITY_IS_DELETED")));
        if let Some((status, code, message, fields)) = real {
            return Err(classify(*status, code, &format!("erasure: {message}"), fields, self.quota_pause));
        }
        if !errors.is_empty() {
            // Only "already gone" failures: allOrNone rolled the rest back, so send it again
            // without them.
            let rest: Vec<Value> = items
                .iter()
                .zip(&requests)
                .filter(|(item, _)| {
                    item_error(item)
                        .is_none_or(|e| e.1 == "PROCESSING_HALTED" || e.1 == "ALL_OR_NONE_OPERATION_ROLLED_BACK")
                })
                .map(|(_, r)| r.clone())
                .collect();
            if rest.len() < requests.len() {
                return Box::pin(self.composite(rest, gone_is_ok)).await;
            }
        }
        Ok(())
    }
}
