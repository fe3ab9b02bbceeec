//! Startup against the org: every object the mapping writes is described and checked (a bad
//! mapping is an error naming the field), the person record type is found (Person mode), and
//! the standard and per-store price books are found or created. Salesforce being unreachable
//! or refusing us is retried until shutdown; only a mapping that does not fit is fatal.

use std::time::Duration;

use reqwest::Method;
use serde_json::json;
use tokio_util::sync::CancellationToken;

use crate::client::{self, SalesforceClient};
use crate::graph::OrgIds;
use crate::mapping::{AccountMode, Described, MappingError, Resolved};

/// Why startup stopped.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Mapping(#[from] MappingError),
}

/// Retries [`check`] until it succeeds, the mapping is refused, or shutdown.
pub async fn prepare(
    client: &SalesforceClient,
    mapping: &Resolved,
    shutdown: &CancellationToken,
) -> Result<Option<OrgIds>, SetupError> {
    let mut wait = Duration::from_millis(500);
    loop {
        match check(client, mapping).await {
            Ok(Ok(org)) => {
                tracing::info!(pricebooks = org.pricebooks.len(), "salesforce org checked against the mapping");
                return Ok(Some(org));
            }
            Ok(Err(e)) => return Err(e.into()),
            Err(error) => {
                tracing::error!(error = %error, error_code = %error.code(), "salesforce startup check failed; retrying");
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = shutdown.cancelled() => return Ok(None),
        }
        wait = (wait * 2).min(Duration::from_secs(30));
    }
}

/// One attempt: the outer error is Salesforce's (retry), the inner the mapping's (fatal).
pub async fn check(client: &SalesforceClient, m: &Resolved) -> client::Result<Result<OrgIds, MappingError>> {
    let ids = &m.ids;
    let account = client.describe("Account").await?;
    let a = Described { object: "Account", describe: &account };
    let mut org = OrgIds::default();
    let mut account_fixed = vec![];
    if m.mode == AccountMode::Person {
        match a.record_type("PersonAccount") {
            Some(rt) => org.person_record_type = Some(rt),
            None => return Ok(Err(MappingError::NoPersonAccounts)),
        }
        account_fixed.push("RecordTypeId");
    }
    if let Err(e) = m.check(&a, &ids.account, &m.account, &account_fixed) {
        return Ok(Err(e));
    }
    if m.mode == AccountMode::Business {
        let contact = client.describe("Contact").await?;
        if let Err(e) =
            m.check(&Described { object: "Contact", describe: &contact }, &ids.contact, &m.contact, &["AccountId"])
        {
            return Ok(Err(e));
        }
    }
    let order = client.describe("Order").await?;
    let fixed = ["AccountId", "Status", "Pricebook2Id"];
    if let Err(e) = m.check(&Described { object: "Order", describe: &order }, &ids.order, &m.order, &fixed) {
        return Ok(Err(e));
    }
    let item = client.describe("OrderItem").await?;
    let fixed = ["OrderId", "PricebookEntryId"];
    if let Err(e) = m.check(&Described { object: "OrderItem", describe: &item }, &ids.order_item, &m.order_item, &fixed)
    {
        return Ok(Err(e));
    }
    let product = client.describe("Product2").await?;
    let p = Described { object: "Product2", describe: &product };
    if let Err(e) = m.check(&p, &ids.product_sku, &Default::default(), &["Name", "ProductCode", "IsActive"]) {
        return Ok(Err(e));
    }
    let entry = client.describe("PricebookEntry").await?;
    let fixed = ["Pricebook2Id", "Product2Id", "UnitPrice", "IsActive"];
    if let Err(e) = m.check(
        &Described { object: "PricebookEntry", describe: &entry },
        &ids.pricebook_entry,
        &Default::default(),
        &fixed,
    ) {
        return Ok(Err(e));
    }
    // Price books: the standard one, and one per store (created when missing).
    let books = client.query("SELECT Id, Name, IsStandard FROM Pricebook2").await?;
    for book in &books {
        if book["IsStandard"] == true {
            org.standard_pricebook = book["Id"].as_str().unwrap_or_default().to_owned();
        }
    }
    for (store, name) in &m.stores {
        let found = books.iter().find(|b| b["Name"] == name.as_str()).and_then(|b| b["Id"].as_str()).map(str::to_owned);
        let id = match found {
            Some(id) => id,
            None => {
                let created = client
                    .call(
                        "create",
                        Method::POST,
                        "/sobjects/Pricebook2",
                        Some(&json!({"Name": name, "IsActive": true})),
                    )
                    .await?;
                tracing::info!(store, pricebook = %name, "price book created");
                created["id"].as_str().unwrap_or_default().to_owned()
            }
        };
        org.pricebooks.insert(*store, id);
    }
    Ok(Ok(org))
}
