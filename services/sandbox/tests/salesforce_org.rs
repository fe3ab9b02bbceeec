//! The simulated org behaves like one (saas-apis.md §7 "Salesforce"): a describe-able schema
//! that refuses unknown objects and fields, case-insensitive matching, the Order lifecycle and
//! Person Accounts.

mod common;

use common::salesforce::{Org, error_code};
use reqwest::Method;
use sandbox::salesforce::SalesforceConfig;
use serde_json::{Value, json};

async fn get(org: &Org, path: &str) -> (u16, Value) {
    let (s, _, b) = org.call(Method::GET, path, None).await;
    (s.as_u16(), b)
}

async fn query(org: &Org, soql: &str) -> Value {
    let (s, body) = get(org, &format!("/query?q={}", soql.replace(' ', "+").replace('=', "%3D"))).await;
    assert_eq!(s, 200, "{soql}: {body}");
    body
}

#[tokio::test]
async fn the_org_schema_is_describable_and_enforced() {
    let org = Org::start(SalesforceConfig::default()).await;
    let (s, global) = get(&org, "/sobjects").await;
    assert_eq!(s, 200);
    let names: Vec<&str> = global["sobjects"].as_array().unwrap().iter().map(|o| o["name"].as_str().unwrap()).collect();
    assert!(names.contains(&"Account") && names.contains(&"Ecommerce_Order__c"), "{names:?}");

    let (s, account) = get(&org, "/sobjects/Account/describe").await;
    assert_eq!(s, 200);
    let field = |d: &Value, name: &str| d["fields"].as_array().unwrap().iter().find(|f| f["name"] == name).cloned();
    let elo = field(&account, "Elo_Id__c").expect("Elo_Id__c described");
    assert_eq!(
        (elo["externalId"].as_bool(), elo["unique"].as_bool(), elo["custom"].as_bool()),
        (Some(true), Some(true), Some(true))
    );
    assert_eq!(field(&account, "Id").unwrap()["type"], "id");
    assert_eq!(field(&account, "Name").unwrap()["nillable"], false);
    assert_eq!(account["keyPrefix"], "001");
    assert_eq!(get(&org, "/sobjects/Acount/describe").await.0, 404);
    assert_eq!(get(&org, "/sobjects/Account").await.1["objectDescribe"]["name"], "Account");

    // An unknown field, standard or custom, is 400 INVALID_FIELD.
    for body in [json!({"Name": "n", "Segment__c": "x"}), json!({"Name": "n", "Bogus": 1})] {
        let (s, b) = org.post("/sobjects/Account", body).await;
        assert_eq!((s.as_u16(), error_code(&b)), (400, "INVALID_FIELD"), "{b}");
    }
    let (s, b) = org.patch("/sobjects/Account/Elo_Id__c/k1", json!({"Name": "n", "Segment__c": "x"})).await;
    assert_eq!((s.as_u16(), error_code(&b)), (400, "INVALID_FIELD"));
    let (s, b) = get(&org, "/query?q=SELECT+Id,+Segment__c+FROM+Account").await;
    assert_eq!((s, error_code(&b)), (400, "INVALID_FIELD"));
    // A misspelt custom object is 404 NOT_FOUND; the declared one works.
    let (s, b) = org.post("/sobjects/Ecommerce_Ordr__c", json!({"Name": "x"})).await;
    assert_eq!((s.as_u16(), error_code(&b)), (404, "NOT_FOUND"));
    let (s, b) = org.post("/sobjects/Ecommerce_Order__c", json!({"Name": "x", "Status__c": "new"})).await;
    assert_eq!(s, 201, "{b}");
    assert!(b["id"].as_str().unwrap().starts_with("a01"));
    // Upsert needs an External ID (or idLookup) field: anything else is the documented 404.
    let (s, b) = org.patch("/sobjects/Account/Description/x", json!({"Name": "n"})).await;
    assert_eq!(s, 404);
    assert_eq!(b, json!([{"errorCode": "NOT_FOUND", "message": "The requested resource does not exist"}]));
    let (s, _) = org.patch("/composite/sobjects/Account/Description", json!({"records": []})).await;
    assert_eq!(s, 404);

    // The control API declares fields at run time; describe and writes follow.
    let add = org
        .http
        .post(format!("{}/salesforce/schema/objects/Account/fields", org.control))
        .json(&json!({"name": "Segment__c", "type": "picklist", "picklistValues": ["A", "B"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(add.status(), 200);
    assert!(field(&get(&org, "/sobjects/Account/describe").await.1, "Segment__c").is_some());
    let (s, b) = org.post("/sobjects/Account", json!({"Name": "n", "Segment__c": "A"})).await;
    assert_eq!(s, 201, "{b}");
    let (s, b) = org.post("/sobjects/Account", json!({"Name": "n", "Segment__c": "Z"})).await;
    assert_eq!((s.as_u16(), error_code(&b)), (400, "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST"));
    let add = org
        .http
        .post(format!("{}/salesforce/schema/objects", org.control))
        .json(&json!({"name": "Shipment__c", "fields": [{"name": "Tracking__c", "externalId": true}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(add.status(), 200);
    let (s, b) = org.patch("/sobjects/Shipment__c/Tracking__c/BR123", json!({"Name": "first"})).await;
    assert_eq!(s, 201, "{b}");
    let bad = org
        .http
        .post(format!("{}/salesforce/schema/objects/Account/fields", org.control))
        .json(&json!({"name": "NoSuffix"}))
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400, "custom fields end in __c");
}

#[tokio::test]
async fn external_ids_and_soql_text_match_ignoring_case_except_unique_case_sensitive() {
    let org = Org::start(SalesforceConfig::default()).await;
    let (s, first) = org.patch("/sobjects/Account/Elo_Id__c/C%3A42", json!({"Name": "Ana"})).await;
    assert_eq!(s, 201);
    let (s, again) = org.patch("/sobjects/Account/Elo_Id__c/c%3A42", json!({"Name": "Ana S."})).await;
    assert_eq!(s, 200, "the same record, whatever the case: {again}");
    assert_eq!(again["id"], first["id"]);
    assert_eq!(get(&org, "/sobjects/Account/Elo_Id__c/c%3A42").await.1["Name"], "Ana S.");
    let rows = query(&org, "SELECT Id, Name FROM Account WHERE Elo_Id__c = 'c:42'").await;
    assert_eq!(rows["totalSize"], 1);
    let rows = query(&org, "SELECT Id FROM Account WHERE Name IN ('ANA S.', 'nobody')").await;
    assert_eq!(rows["totalSize"], 1, "IN on text ignores case too");
    let (s, b) = org.post("/sobjects/Account", json!({"Name": "Other", "Elo_Id__c": "C:42"})).await;
    assert_eq!((s.as_u16(), error_code(&b)), (400, "DUPLICATE_VALUE"), "unique, case-insensitively: {b}");

    // Product2.Sku__c is unique and case-sensitive: ABC and abc are two records.
    let (s, _) = org.patch("/sobjects/Product2/Sku__c/ABC", json!({"Name": "upper"})).await;
    assert_eq!(s, 201);
    let (s, _) = org.patch("/sobjects/Product2/Sku__c/abc", json!({"Name": "lower"})).await;
    assert_eq!(s, 201, "a case-sensitive external id tells them apart");
    let rows = query(&org, "SELECT Name FROM Product2 WHERE Sku__c = 'abc'").await;
    assert_eq!(rows["totalSize"], 1);
    assert_eq!(rows["records"][0]["Name"], "lower");
}

#[tokio::test]
async fn orders_start_as_draft_activate_with_items_and_then_lock() {
    let org = Org::start(SalesforceConfig::default()).await;
    let standard = query(&org, "SELECT Id FROM Pricebook2").await["records"][0]["Id"].as_str().unwrap().to_owned();
    let (_, account) = org.post("/sobjects/Account", json!({"Name": "Loja"})).await;
    let (_, product) = org.post("/sobjects/Product2", json!({"Name": "Camiseta", "IsActive": true})).await;
    let (_, entry) = org
        .post(
            "/sobjects/PricebookEntry",
            json!({"Pricebook2Id": standard, "Product2Id": product["id"], "UnitPrice": 10, "IsActive": true}),
        )
        .await;
    let (_, other) = org.post("/sobjects/Product2", json!({"Name": "Retired"})).await;
    let (_, inactive) = org
        .post(
            "/sobjects/PricebookEntry",
            json!({"Pricebook2Id": standard, "Product2Id": other["id"], "UnitPrice": 5, "IsActive": false}),
        )
        .await;
    let header = |status: &str| json!({"AccountId": account["id"], "EffectiveDate": "2026-11-30", "Status": status, "Pricebook2Id": standard});

    let (s, b) = org.post("/sobjects/Order", header("Activated")).await;
    assert_eq!((s.as_u16(), error_code(&b)), (400, "FIELD_INTEGRITY_EXCEPTION"), "inserted as Draft only");
    let (s, b) = org.post("/sobjects/Order", header("Shipped")).await;
    assert_eq!((s.as_u16(), error_code(&b)), (400, "INVALID_OR_NULL_FOR_RESTRICTED_PICKLIST"));
    let (s, order) = org.post("/sobjects/Order", header("Draft")).await;
    assert_eq!(s, 201);
    let order_id = order["id"].as_str().unwrap();
    let (s, b) = org.patch(&format!("/sobjects/Order/{order_id}"), json!({"Status": "Activated"})).await;
    assert_eq!((s.as_u16(), error_code(&b)), (400, "FIELD_INTEGRITY_EXCEPTION"), "activation needs items");

    let item =
        |entry: &Value| json!({"OrderId": order_id, "PricebookEntryId": entry["id"], "Quantity": 1, "UnitPrice": 10});
    let (s, b) = org.post("/sobjects/OrderItem", item(&inactive)).await;
    assert_eq!((s.as_u16(), error_code(&b)), (400, "FIELD_INTEGRITY_EXCEPTION"));
    assert!(b[0]["message"].as_str().unwrap().contains("inactive"), "{b}");
    let (s, first_item) = org.post("/sobjects/OrderItem", item(&entry)).await;
    assert_eq!(s, 201);
    let (s, b) = org.patch(&format!("/sobjects/Order/{order_id}"), json!({"Status": "Activated"})).await;
    assert_eq!(s, 204, "{b}");

    let (s, b) = org.post("/sobjects/OrderItem", item(&entry)).await;
    assert_eq!((s.as_u16(), error_code(&b)), (400, "ENTITY_IS_LOCKED"), "no items added after activation");
    let item_path = format!("/sobjects/OrderItem/{}", first_item["id"].as_str().unwrap());
    let (s, _, b) = org.call(Method::DELETE, &item_path, None).await;
    assert_eq!((s.as_u16(), error_code(&b)), (400, "ENTITY_IS_LOCKED"), "nor removed");
    let (_, other_account) = org.post("/sobjects/Account", json!({"Name": "Outra"})).await;
    let (s, b) = org.patch(&format!("/sobjects/Order/{order_id}"), json!({"AccountId": other_account["id"]})).await;
    assert_eq!((s.as_u16(), error_code(&b)), (400, "FIELD_INTEGRITY_EXCEPTION"), "header edits are restricted");
    let (s, _) = org.patch(&format!("/sobjects/Order/{order_id}"), json!({"Description": "gift"})).await;
    assert_eq!(s, 204, "other header fields stay editable");
    let (s, _) = org.patch(&format!("/sobjects/Order/{order_id}"), json!({"Status": "Draft"})).await;
    assert_eq!(s, 204, "back to Draft");
    let (s, _, _) = org.call(Method::DELETE, &item_path, None).await;
    assert_eq!(s, 204, "a draft order's items can go");
}

#[tokio::test]
async fn person_accounts_are_an_org_setting() {
    let org = Org::start(SalesforceConfig::default()).await;
    let person = json!({"FirstName": "Ana", "LastName": "Souza", "PersonEmail": "ana@example.com"});
    let (s, b) = org.post("/sobjects/Account", person.clone()).await;
    assert_eq!((s.as_u16(), error_code(&b)), (400, "INVALID_FIELD"), "no person fields without the setting");

    let on = org
        .http
        .put(format!("{}/salesforce/config", org.control))
        .json(&json!({"person_accounts": true}))
        .send()
        .await
        .unwrap();
    assert_eq!(on.status(), 200);
    let types = query(&org, "SELECT Id FROM RecordType WHERE SobjectType = 'Account' AND IsPersonType = true").await;
    assert_eq!(types["totalSize"], 1);
    let person_type = types["records"][0]["Id"].as_str().unwrap().to_owned();
    let mut business = person.clone();
    business["Name"] = json!("Souza Ltda");
    let (s, b) = org.post("/sobjects/Account", business).await;
    assert_eq!((s.as_u16(), error_code(&b)), (400, "INVALID_FIELD"), "a business account has no person fields");
    let (s, b) = org.post("/sobjects/Account", json!({"RecordTypeId": person_type, "FirstName": "Ana"})).await;
    assert_eq!((s.as_u16(), error_code(&b)), (400, "REQUIRED_FIELD_MISSING"), "LastName, not Name: {b}");

    let mut body = person.clone();
    body["RecordTypeId"] = json!(person_type);
    body["Loyalty_Tier__pc"] = json!("gold");
    let (s, created) = org.patch("/sobjects/Account/Elo_Id__c/c%3A7", body).await;
    assert_eq!(s, 201, "{created}");
    let (_, account) = get(&org, "/sobjects/Account/Elo_Id__c/c%3A7").await;
    assert_eq!(account["IsPersonAccount"], true);
    assert_eq!(account["Name"], "Ana Souza");
    assert_eq!(account["PersonEmail"], "ana@example.com");
    let contact_id = account["PersonContactId"].as_str().expect("the hidden contact").to_owned();
    let (_, contact) = get(&org, &format!("/sobjects/Contact/{contact_id}")).await;
    assert_eq!(
        (contact["Email"].as_str(), contact["Loyalty_Tier__c"].as_str()),
        (Some("ana@example.com"), Some("gold"))
    );
    let (_, describe) = get(&org, "/sobjects/Account/describe").await;
    let names: Vec<&str> = describe["fields"].as_array().unwrap().iter().map(|f| f["name"].as_str().unwrap()).collect();
    for field in ["FirstName", "LastName", "PersonEmail", "IsPersonAccount", "PersonContactId", "Loyalty_Tier__pc"] {
        assert!(names.contains(&field), "{field} described");
    }
    assert_eq!(describe["recordTypeInfos"].as_array().unwrap().len(), 2);
    let (s, _) = org.post("/sobjects/Account", json!({"Name": "Empresa Ltda"})).await;
    assert_eq!(s, 201, "business accounts still work");
}
