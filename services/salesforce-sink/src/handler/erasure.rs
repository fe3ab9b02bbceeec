//! `CUSTOMER_ERASED`: the key's Account and Contact anonymised, found by external id.

use std::collections::BTreeMap;

use elo_events::CommerceEvent;
use elo_kafka::HandlerError;
use reqwest::Method;
use serde_json::json;

use super::{Sink, classify, from_client, item_error};
use crate::client;
use crate::mapping::AccountMode;

impl Sink {
    /// Anonymises the Account (and Contact) of an erased customer key, found by external id:
    /// names become "Erased", e-mail and phone are cleared. Orders stay (they are the
    /// business's records) but no longer point at a person. Returns the ids it changed.
    pub(super) async fn erase(&self, e: &CommerceEvent) -> Result<BTreeMap<String, String>, HandlerError> {
        let ids = &self.mapping.ids;
        // Customer keys are `c:<digits>` or `g:<hex>`; anything else is refused, not quoted.
        let key = &e.customer_key;
        if !key.chars().all(|c| c.is_ascii_alphanumeric() || c == ':') {
            return Err(HandlerError::permanent("unmappable", "customer key with unexpected characters"));
        }
        let fail = |err: client::Error| from_client(&err, self.quota_pause);
        let accounts = self
            .client
            .query(&format!("SELECT Id FROM Account WHERE {} = '{key}'", ids.account))
            .await
            .map_err(fail)?;
        let contacts = if self.mapping.mode == AccountMode::Business {
            self.client.query(&format!("SELECT Id FROM Contact WHERE {} = '{key}'", ids.contact)).await.map_err(fail)?
        } else {
            Vec::new()
        };
        let version = self.client.api_version().to_owned();
        let mut requests = Vec::new();
        let mut changed = BTreeMap::new();
        for a in &accounts {
            let id = a["Id"].as_str().unwrap_or_default();
            let body = match self.mapping.mode {
                AccountMode::Business => json!({"Name": "Erased customer", "Phone": null}),
                AccountMode::Person => {
                    json!({"FirstName": null, "LastName": "Erased", "PersonEmail": null, "Phone": null})
                }
            };
            requests.push(json!({"method": "PATCH", "url": format!("/services/data/{version}/sobjects/Account/{id}"), "referenceId": format!("a{}", requests.len()), "body": body}));
            changed.insert("Account".to_owned(), id.to_owned());
        }
        for c in &contacts {
            let id = c["Id"].as_str().unwrap_or_default();
            let body =
                json!({"FirstName": null, "LastName": "Erased", "Email": null, "Phone": null, "MobilePhone": null});
            requests.push(json!({"method": "PATCH", "url": format!("/services/data/{version}/sobjects/Contact/{id}"), "referenceId": format!("c{}", requests.len()), "body": body}));
            changed.insert("Contact".to_owned(), id.to_owned());
        }
        if requests.is_empty() {
            return Ok(changed);
        }
        let response = self
            .client
            .call(
                "composite",
                Method::POST,
                "/composite",
                Some(&json!({"allOrNone": true, "compositeRequest": requests})),
            )
            .await
            .map_err(fail)?;
        let items = response["compositeResponse"].as_array().cloned().unwrap_or_default();
        if let Some((status, code, message, fields)) =
            items.iter().filter_map(item_error).find(|e| e.1 != "PROCESSING_HALTED")
        {
            return Err(classify(status, &code, &format!("erasure: {message}"), &fields, self.quota_pause));
        }
        Ok(changed)
    }
}
