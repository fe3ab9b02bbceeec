//! Salesforce simulator conformance, written from `../shared/docs/saas-apis.md` §2 (not from
//! the simulator's code): status codes, error bodies, limits and semantics a real org shows.

mod common;

use common::salesforce::{Org, error_code};
use sandbox::salesforce::SalesforceConfig;
use serde_json::{Value, json};

#[tokio::test]
async fn oauth_client_credentials_issue_bearer_tokens_without_expiry_or_refresh() {
    let org = Org::start(SalesforceConfig::default()).await;
    let url = format!("{}/services/oauth2/token", org.base);
    let ok: Value = org
        .http
        .post(&url)
        .form(&[
            ("grant_type", "client_credentials"),
            ("client_id", "elo-sandbox-client"),
            ("client_secret", "elo-sandbox-secret"),
        ])
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(ok["token_type"], "Bearer");
    assert_eq!(ok["instance_url"], org.base);
    for key in ["access_token", "signature", "token_format", "id", "issued_at"] {
        assert!(ok.get(key).is_some(), "missing {key}: {ok}");
    }
    assert!(ok.get("expires_in").is_none() && ok.get("refresh_token").is_none(), "{ok}");

    let bad = org
        .http
        .post(&url)
        .form(&[("grant_type", "client_credentials"), ("client_id", "elo-sandbox-client"), ("client_secret", "nope")])
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status(), 400);
    assert_eq!(bad.json::<Value>().await.unwrap()["error"], "invalid_client");
    let unsupported = org.http.post(&url).form(&[("grant_type", "password")]).send().await.unwrap();
    assert_eq!(unsupported.status(), 400);
    assert_eq!(unsupported.json::<Value>().await.unwrap()["error"], "unsupported_grant_type");
}

#[tokio::test]
async fn missing_or_revoked_tokens_get_401_invalid_session_id() {
    let org = Org::start(SalesforceConfig::default()).await;
    let anonymous = org.http.get(format!("{}/services/data/v66.0/limits", org.base)).send().await.unwrap();
    assert_eq!(anonymous.status(), 401);
    let body: Value = anonymous.json().await.unwrap();
    assert_eq!(body, json!([{"message": "Session expired or invalid", "errorCode": "INVALID_SESSION_ID"}]));

    let (status, _, _) = org.call(reqwest::Method::GET, "/limits", None).await;
    assert_eq!(status, 200);
    org.http.post(format!("{}/salesforce/revoke-tokens", org.control)).send().await.unwrap();
    let (status, _, body) = org.call(reqwest::Method::GET, "/limits", None).await;
    assert_eq!(status, 401);
    assert_eq!(error_code(&body), "INVALID_SESSION_ID");
}

#[tokio::test]
async fn upsert_by_external_id_answers_201_then_200_created_false() {
    let org = Org::start(SalesforceConfig::default()).await;
    let (status, first) = org.patch("/sobjects/Account/Elo_Id__c/c%3A42", json!({"Name": "Ana Souza"})).await;
    assert_eq!(status, 201, "{first}");
    assert_eq!(first["created"], true);
    assert_eq!(first["success"], true);
    assert_eq!(first["errors"], json!([]));
    let (status, second) = org.patch("/sobjects/Account/Elo_Id__c/c%3A42", json!({"Name": "Ana S. Souza"})).await;
    assert_eq!(status, 200, "{second}");
    assert_eq!(second["created"], false);
    assert_eq!(second["id"], first["id"]);
    // Before v46 an update answered 204 with no body.
    let resp = org
        .http
        .patch(format!("{}/services/data/v45.0/sobjects/Account/Elo_Id__c/c%3A42", org.base))
        .bearer_auth(&org.token)
        .json(&json!({"Name": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 204);
    let (status, _, record) = org.call(reqwest::Method::GET, "/sobjects/Account/Elo_Id__c/c%3A42", None).await;
    assert_eq!(status, 200);
    assert_eq!(record["Name"], "x");
    assert_eq!(record["attributes"]["type"], "Account");
}

#[tokio::test]
async fn upsert_edge_cases_300_404_405() {
    let org = Org::start(SalesforceConfig::default()).await;
    for _ in 0..2 {
        let (s, b) = org.post("/sobjects/Account", json!({"Name": "Twin", "Legacy_Id__c": "L1"})).await;
        assert_eq!(s, 201, "{b}");
    }
    let (status, body) = org.patch("/sobjects/Account/Legacy_Id__c/L1", json!({"Name": "Twin"})).await;
    assert_eq!(status, 300, "{body}");
    assert_eq!(body.as_array().unwrap().len(), 2);
    assert!(body[0].as_str().unwrap().starts_with("/services/data/v66.0/sobjects/Account/001"));

    let (status, body) = org.patch("/sobjects/Account/NotAField/x", json!({"Name": "n"})).await;
    assert_eq!(status, 404);
    assert_eq!(body, json!([{"errorCode": "NOT_FOUND", "message": "The requested resource does not exist"}]));

    let (status, body) = org.patch("/sobjects/Account/Elo_Id__c", json!({"Name": "n"})).await;
    assert_eq!(status, 405);
    assert_eq!(error_code(&body), "METHOD_NOT_ALLOWED");
}

#[tokio::test]
async fn collections_upsert_limits_order_and_all_or_none() {
    let org = Org::start(SalesforceConfig::default()).await;
    let records = |n: usize| -> Vec<Value> {
        (0..n).map(|i| json!({"attributes": {"type": "Contact"}, "Elo_Id__c": format!("k{i}"), "LastName": format!("L{i}")})).collect()
    };

    let (status, body) =
        org.patch("/composite/sobjects/Contact/Elo_Id__c", json!({"allOrNone": false, "records": records(201)})).await;
    assert_eq!(status, 400, "201 records must be refused: {body}");

    let mut mixed = records(3);
    mixed[1] = json!({"attributes": {"type": "Contact"}, "Elo_Id__c": "bad", "FirstName": "no last name"});
    let (status, rows) =
        org.patch("/composite/sobjects/Contact/Elo_Id__c", json!({"allOrNone": false, "records": mixed})).await;
    assert_eq!(status, 200, "partial failure is still 200: {rows}");
    let rows = rows.as_array().unwrap();
    assert_eq!(rows.len(), 3);
    assert_eq!((rows[0]["success"].clone(), rows[0]["created"].clone()), (json!(true), json!(true)));
    assert_eq!(rows[1]["success"], false);
    assert_eq!(rows[1]["errors"][0]["statusCode"], "REQUIRED_FIELD_MISSING");
    assert_eq!(rows[1]["errors"][0]["fields"], json!(["LastName"]));
    assert!(rows[1]["errors"][0]["message"].is_string());
    assert_eq!(rows[2]["success"], true);

    let (_, again) = org.patch("/composite/sobjects/Contact/Elo_Id__c", json!({"records": records(1)})).await;
    assert_eq!(again[0]["created"], false, "second upsert of k0 updates");

    let mut all_or_none = records(5);
    for r in all_or_none.iter_mut() {
        r["Elo_Id__c"] = json!(format!("aon-{}", r["Elo_Id__c"].as_str().unwrap()));
    }
    all_or_none[4] = json!({"attributes": {"type": "Contact"}, "Elo_Id__c": "aon-bad"});
    let (status, rows) =
        org.patch("/composite/sobjects/Contact/Elo_Id__c", json!({"allOrNone": true, "records": all_or_none})).await;
    assert_eq!(status, 200);
    assert!(rows.as_array().unwrap().iter().all(|r| r["success"] == false), "{rows}");
    assert_eq!(rows[0]["errors"][0]["statusCode"], "ALL_OR_NONE_OPERATION_ROLLED_BACK");
    let (_, _, q) =
        org.call(reqwest::Method::GET, "/query?q=SELECT+Id+FROM+Contact+WHERE+Elo_Id__c+%3D+'aon-k0'", None).await;
    assert_eq!(q["totalSize"], 0, "rolled back rows are not saved");

    let (_, rows) = org
        .patch("/composite/sobjects/Contact/Elo_Id__c", json!({"records": [{"Elo_Id__c": "x", "LastName": "y"}]}))
        .await;
    assert_eq!(rows[0]["success"], false, "attributes.type is required: {rows}");
}

#[tokio::test]
async fn composite_resolves_references_and_caps_at_25() {
    let org = Org::start(SalesforceConfig::default()).await;
    let (status, body) = org
        .post(
            "/composite",
            json!({"allOrNone": true, "compositeRequest": [
                {"method": "PATCH", "url": "/services/data/v66.0/sobjects/Account/Elo_Id__c/c1", "referenceId": "acct", "body": {"Name": "Ana"}},
                {"method": "POST", "url": "/services/data/v66.0/sobjects/Contact", "referenceId": "contact", "body": {"LastName": "Souza", "AccountId": "@{acct.id}"}},
                {"method": "GET", "url": "/services/data/v66.0/sobjects/Contact/@{contact.id}", "referenceId": "read"}
            ]}),
        )
        .await;
    assert_eq!(status, 200);
    let items = body["compositeResponse"].as_array().unwrap();
    assert_eq!(items.iter().map(|i| i["httpStatusCode"].as_u64().unwrap()).collect::<Vec<_>>(), vec![201, 201, 200]);
    assert_eq!(items[2]["body"]["AccountId"], items[0]["body"]["id"]);
    assert_eq!(items[1]["referenceId"], "contact");

    let many: Vec<Value> = (0..26)
        .map(|i| json!({"method": "GET", "url": "/services/data/v66.0/limits", "referenceId": format!("r{i}")}))
        .collect();
    let (status, body) = org.post("/composite", json!({"compositeRequest": many})).await;
    assert_eq!(status, 400, "{body}");

    let (_, body) = org
        .post(
            "/composite",
            json!({"allOrNone": true, "compositeRequest": [
                {"method": "POST", "url": "/services/data/v66.0/sobjects/Account", "referenceId": "ok", "body": {"Name": "kept?"}},
                {"method": "POST", "url": "/services/data/v66.0/sobjects/Contact", "referenceId": "bad", "body": {"FirstName": "no last"}}
            ]}),
        )
        .await;
    let items = body["compositeResponse"].as_array().unwrap();
    assert_eq!(items[1]["httpStatusCode"], 400);
    assert_eq!(items[0]["body"][0]["errorCode"], "PROCESSING_HALTED", "allOrNone rolls back the first: {body}");
}

#[tokio::test]
async fn exhausted_quota_is_403_request_limit_exceeded_with_limit_info() {
    let org = Org::start(SalesforceConfig { daily_quota: 3, ..SalesforceConfig::default() }).await;
    for i in 1..=3 {
        let (status, headers, _) = org.call(reqwest::Method::GET, "/limits", None).await;
        assert_eq!(status, 200);
        assert_eq!(headers["sforce-limit-info"], format!("api-usage={i}/3"));
    }
    let (status, headers, body) = org.call(reqwest::Method::GET, "/limits", None).await;
    assert_eq!(status, 403, "quota is 403, not 429");
    assert_eq!(body, json!([{"message": "TotalRequests Limit exceeded.", "errorCode": "REQUEST_LIMIT_EXCEEDED"}]));
    assert_eq!(headers["sforce-limit-info"], "api-usage=3/3");
}

#[tokio::test]
async fn orders_need_accounts_and_items_need_the_orders_price_book() {
    let org = Org::start(SalesforceConfig::default()).await;
    let (status, body) = org.post("/sobjects/Order", json!({"EffectiveDate": "2026-11-28", "Status": "Draft"})).await;
    assert_eq!(status, 400);
    assert_eq!(error_code(&body), "REQUIRED_FIELD_MISSING");
    assert_eq!(body[0]["fields"], json!(["AccountId"]));

    let (_, acct) = org.patch("/sobjects/Account/Elo_Id__c/c1", json!({"Name": "Ana"})).await;
    let (_, product) = org.post("/sobjects/Product2", json!({"Name": "Caneca", "ProductCode": "SKU-1"})).await;
    let books = org.call(reqwest::Method::GET, "/query?q=SELECT+Id+FROM+Pricebook2", None).await.2["records"].clone();
    let standard = books[0]["Id"].as_str().unwrap().to_owned();
    let (_, custom_book) = org.post("/sobjects/Pricebook2", json!({"Name": "Loja BR", "IsActive": true})).await;
    let (status, body) = org
        .post(
            "/sobjects/PricebookEntry",
            json!({"Pricebook2Id": custom_book["id"], "Product2Id": product["id"], "UnitPrice": 10}),
        )
        .await;
    assert_eq!(
        (status.as_u16(), error_code(&body)),
        (400, "FIELD_INTEGRITY_EXCEPTION"),
        "custom price needs a standard price first"
    );
    let (s, std_entry) = org
        .post(
            "/sobjects/PricebookEntry",
            json!({"Pricebook2Id": standard, "Product2Id": product["id"], "UnitPrice": 10, "IsActive": true}),
        )
        .await;
    assert_eq!(s, 201, "{std_entry}");
    let (_, custom_entry) = org
        .post(
            "/sobjects/PricebookEntry",
            json!({"Pricebook2Id": custom_book["id"], "Product2Id": product["id"], "UnitPrice": 9, "IsActive": true}),
        )
        .await;

    let (s, order) = org.post("/sobjects/Order", json!({"Account": {"Elo_Id__c": "c1"}, "EffectiveDate": "2026-11-28", "Status": "Draft", "Pricebook2Id": standard})).await;
    assert_eq!(s, 201, "account referenced by external id: {order}");
    let (status, body) = org
        .post(
            "/sobjects/OrderItem",
            json!({"OrderId": order["id"], "PricebookEntryId": custom_entry["id"], "Quantity": 1, "UnitPrice": 9}),
        )
        .await;
    assert_eq!((status.as_u16(), error_code(&body)), (400, "FIELD_INTEGRITY_EXCEPTION"));
    let (status, body) = org
        .post(
            "/sobjects/OrderItem",
            json!({"OrderId": order["id"], "PricebookEntryId": std_entry["id"], "Quantity": 2, "UnitPrice": 10}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = org
        .post(
            "/sobjects/Order",
            json!({"Account": {"Elo_Id__c": "nobody"}, "EffectiveDate": "2026-11-28", "Status": "Draft"}),
        )
        .await;
    assert_eq!((status.as_u16(), error_code(&body)), (400, "INVALID_FIELD"));
    assert_eq!(acct["created"], true);
}

#[tokio::test]
async fn duplicate_rules_and_injected_row_locks() {
    let org = Org::start(SalesforceConfig::default()).await;
    let (s, _) = org.patch("/sobjects/Contact/Elo_Id__c/a", json!({"LastName": "A", "Email": "ana@example.com"})).await;
    assert_eq!(s, 201);
    let (status, body) =
        org.patch("/sobjects/Contact/Elo_Id__c/b", json!({"LastName": "B", "Email": "ANA@example.com"})).await;
    assert_eq!(status, 400, "duplicate rules fire on upsert too");
    assert_eq!(error_code(&body), "DUPLICATES_DETECTED");

    let resp = org
        .http
        .put(format!("{}/salesforce/config", org.control))
        .json(&json!({"lock_row_rate": 1.0}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (status, body) = org.patch("/sobjects/Account/Elo_Id__c/z", json!({"Name": "Z"})).await;
    assert_eq!((status.as_u16(), error_code(&body)), (400, "UNABLE_TO_LOCK_ROW"));
    assert!(body[0]["message"].as_str().unwrap().starts_with("unable to obtain exclusive access to this record"));
}

#[tokio::test]
async fn soql_pages_with_next_records_url() {
    let org = Org::start(SalesforceConfig::default()).await;
    let records: Vec<Value> = (0..450)
        .map(|i| json!({"attributes": {"type": "Account"}, "Elo_Id__c": format!("p{i:03}"), "Name": format!("N{i}")}))
        .collect();
    for chunk in records.chunks(200) {
        let (s, _) = org.patch("/composite/sobjects/Account/Elo_Id__c", json!({"records": chunk})).await;
        assert_eq!(s, 200);
    }
    let mut seen = Vec::new();
    let mut url = format!(
        "{}/services/data/v66.0/query?q=SELECT+Id,+Elo_Id__c+FROM+Account+WHERE+Elo_Id__c+!%3D+null+ORDER+BY+Elo_Id__c",
        org.base
    );
    loop {
        let page: Value = org
            .http
            .get(&url)
            .bearer_auth(&org.token)
            .header("Sforce-Query-Options", "batchSize=200")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        seen.extend(page["records"].as_array().unwrap().iter().map(|r| r["Elo_Id__c"].as_str().unwrap().to_owned()));
        if page["done"] == true {
            assert!(page.get("nextRecordsUrl").is_none());
            break;
        }
        assert_eq!(page["records"].as_array().unwrap().len(), 200);
        url = format!("{}{}", org.base, page["nextRecordsUrl"].as_str().unwrap());
    }
    assert_eq!(seen.len(), 450);
    assert_eq!(seen[0], "p000");
    assert_eq!(seen[449], "p449");

    let (status, _, body) = org.call(reqwest::Method::GET, "/query?q=SELEC+Id+FROM+Account", None).await;
    assert_eq!((status.as_u16(), error_code(&body)), (400, "MALFORMED_QUERY"));
    let (status, _, body) = org.call(reqwest::Method::GET, "/query?q=SELECT+Nope__x+FROM+Account", None).await;
    assert_eq!((status.as_u16(), error_code(&body)), (400, "INVALID_FIELD"));
}

#[tokio::test]
async fn composite_graph_is_all_or_nothing_per_graph_and_halts_after_14_failures() {
    let org = Org::start(SalesforceConfig::default()).await;
    let good = |i: usize| {
        json!({"graphId": format!("g{i}"), "compositeRequest": [
            {"method": "PATCH", "url": format!("/services/data/v66.0/sobjects/Account/Elo_Id__c/g{i}"), "referenceId": "a", "body": {"Name": "ok"}},
            {"method": "POST", "url": "/services/data/v66.0/sobjects/Contact", "referenceId": "c", "body": {"LastName": "x", "AccountId": "@{a.id}"}}
        ]})
    };
    let bad = |i: usize| {
        json!({"graphId": format!("b{i}"), "compositeRequest": [
            {"method": "PATCH", "url": format!("/services/data/v66.0/sobjects/Account/Elo_Id__c/b{i}"), "referenceId": "a", "body": {"Name": "rolled back"}},
            {"method": "POST", "url": "/services/data/v66.0/sobjects/Contact", "referenceId": "c", "body": {"FirstName": "no last name"}}
        ]})
    };
    let mut graphs = vec![good(0)];
    graphs.extend((0..15).map(bad));
    graphs.push(good(1));
    let (status, body) = org.post("/composite/graph", json!({"graphs": graphs})).await;
    assert_eq!(status, 200);
    let out = body["graphs"].as_array().unwrap();
    assert_eq!(out[0]["isSuccessful"], true);
    assert_eq!(out[1]["isSuccessful"], false);
    assert_eq!(out[16]["isSuccessful"], false, "after 14 failed graphs the rest are halted");
    assert_eq!(out[16]["graphResponse"]["compositeResponse"][0]["body"][0]["errorCode"], "PROCESSING_HALTED");
    let (_, _, q) =
        org.call(reqwest::Method::GET, "/query?q=SELECT+Id+FROM+Account+WHERE+Elo_Id__c+%3D+'b0'", None).await;
    assert_eq!(q["totalSize"], 0, "a failed graph leaves nothing behind");

    let nodes: Vec<Value> = (0..501)
        .map(|i| json!({"method": "GET", "url": "/services/data/v66.0/limits", "referenceId": format!("r{i}")}))
        .collect();
    let (status, _) =
        org.post("/composite/graph", json!({"graphs": [{"graphId": "big", "compositeRequest": nodes}]})).await;
    assert_eq!(status, 400, "more than 500 nodes is refused");
}

#[tokio::test]
async fn malformed_requests_get_salesforce_errors_not_panics() {
    let org = Org::start(SalesforceConfig::default()).await;
    let resp = org
        .http
        .post(format!("{}/services/data/v66.0/sobjects/Account", org.base))
        .bearer_auth(&org.token)
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400);
    assert_eq!(error_code(&resp.json::<Value>().await.unwrap()), "JSON_PARSER_ERROR");
    let (status, body) = org.post("/sobjects/Account", json!({"Name": "n", "Bogus": 1})).await;
    assert_eq!((status.as_u16(), error_code(&body)), (400, "INVALID_FIELD"));
    let (status, body) = org.post("/sobjects/Nope", json!({})).await;
    assert_eq!((status.as_u16(), error_code(&body)), (404, "NOT_FOUND"));
    let (status, body) =
        org.post("/sobjects/Account", json!({"Name": "n", "CreatedDate": "2020-01-01T00:00:00Z"})).await;
    assert_eq!((status.as_u16(), error_code(&body)), (400, "INVALID_FIELD_FOR_INSERT_UPDATE"));
    let unknown_version =
        org.http.get(format!("{}/services/data/v99.0/limits", org.base)).bearer_auth(&org.token).send().await.unwrap();
    assert_eq!(unknown_version.status(), 404);
}

#[tokio::test]
async fn bulk_2_0_ingest_runs_the_job_state_machine_and_reports_csv_results() {
    let org = Org::start(SalesforceConfig::default()).await;
    let (status, body) =
        org.post("/jobs/ingest", json!({"object": "Contact", "operation": "upsert", "contentType": "CSV"})).await;
    assert_eq!((status.as_u16(), error_code(&body)), (400, "INVALIDJOB"), "upsert needs externalIdFieldName");
    let (status, body) = org
        .post(
            "/jobs/ingest",
            json!({"object": "Account", "operation": "upsert", "externalIdFieldName": "Website", "contentType": "CSV"}),
        )
        .await;
    assert_eq!((status.as_u16(), error_code(&body)), (400, "INVALIDJOB"), "and an External ID field: {body}");

    let (status, job) = org
        .post("/jobs/ingest", json!({"object": "Contact", "operation": "upsert", "externalIdFieldName": "Elo_Id__c", "contentType": "CSV", "lineEnding": "LF"}))
        .await;
    assert_eq!(status, 200, "{job}");
    assert_eq!(job["state"], "Open");
    let id = job["id"].as_str().unwrap().to_owned();
    assert!(job["contentUrl"].as_str().unwrap().ends_with(&format!("/jobs/ingest/{id}/batches")));

    let csv = "Elo_Id__c,LastName,Email\nb1,Souza,\"a@example.com\"\nb2,,no-last-name@example.com\nb3,\"Lima, Jr\",c@example.com\n";
    let upload = |body: &'static str| {
        org.http
            .put(format!("{}/services/data/v66.0/jobs/ingest/{id}/batches", org.base))
            .bearer_auth(&org.token)
            .header("content-type", "text/csv")
            .body(body)
            .send()
    };
    let resp = upload(csv).await.unwrap();
    assert_eq!(resp.status(), 201);
    assert!(resp.text().await.unwrap().is_empty());

    let (status, closed) = org.patch(&format!("/jobs/ingest/{id}"), json!({"state": "UploadComplete"})).await;
    assert_eq!(status, 200);
    assert_eq!(closed["state"], "UploadComplete");
    assert_eq!(upload("Elo_Id__c,LastName\nb9,X\n").await.unwrap().status(), 409, "no uploads after UploadComplete");

    let mut states = Vec::new();
    for _ in 0..5 {
        let (_, _, info) = org.call(reqwest::Method::GET, &format!("/jobs/ingest/{id}"), None).await;
        let state = info["state"].as_str().unwrap().to_owned();
        if states.last() != Some(&state) {
            states.push(state.clone());
        }
        if state == "JobComplete" {
            assert_eq!(info["numberRecordsProcessed"], 3);
            assert_eq!(info["numberRecordsFailed"], 1);
            break;
        }
    }
    assert_eq!(states, vec!["InProgress", "JobComplete"]);

    let get_csv = |kind: &str| {
        let url = format!("{}/services/data/v66.0/jobs/ingest/{id}/{kind}/", org.base);
        let req = org.http.get(url).bearer_auth(&org.token);
        async move {
            let r = req.send().await.unwrap();
            assert_eq!(r.headers()["content-type"], "text/csv");
            r.text().await.unwrap()
        }
    };
    let ok = get_csv("successfulResults").await;
    let lines: Vec<&str> = ok.lines().collect();
    assert_eq!(lines[0], r#""sf__Id","sf__Created","Elo_Id__c","LastName","Email""#);
    assert_eq!(lines.len(), 3);
    assert!(lines.iter().any(|l| l.contains(r#""true","b3","Lima, Jr""#)), "{ok}");
    let failed = get_csv("failedResults").await;
    assert!(failed.starts_with(r#""sf__Id","sf__Error","Elo_Id__c""#), "{failed}");
    assert!(failed.contains("REQUIRED_FIELD_MISSING"), "{failed}");
    let (_, _, q) =
        org.call(reqwest::Method::GET, "/query?q=SELECT+Id+FROM+Contact+WHERE+Elo_Id__c+IN+('b1','b3')", None).await;
    assert_eq!(q["totalSize"], 2, "the job's rows landed");
}

/// An RSA key pair made with openssl: (private PEM, public PEM).
fn rsa_pair(dir: &std::path::Path, name: &str) -> (String, String) {
    let private = dir.join(format!("{name}.key"));
    let public = dir.join(format!("{name}.pub"));
    let ok = std::process::Command::new("openssl")
        .args(["genrsa", "-out"])
        .arg(&private)
        .arg("2048")
        .output()
        .unwrap()
        .status
        .success()
        && std::process::Command::new("openssl")
            .args(["rsa", "-pubout", "-in"])
            .arg(&private)
            .arg("-out")
            .arg(&public)
            .output()
            .unwrap()
            .status
            .success();
    assert!(ok, "openssl could not make a key pair");
    (std::fs::read_to_string(private).unwrap(), std::fs::read_to_string(public).unwrap())
}

#[tokio::test]
async fn jwt_bearer_flow_verifies_signature_issuer_audience_and_expiry() {
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
    let dir = std::env::temp_dir().join(format!("sf-jwt-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (private, public) = rsa_pair(&dir, "app");
    let (other_private, _) = rsa_pair(&dir, "other");
    let org = Org::start(SalesforceConfig { jwt_public_key_pem: Some(public), ..SalesforceConfig::default() }).await;
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let assertion = |key: &str, iss: &str, aud: &str, exp: u64| {
        let claims = json!({"iss": iss, "sub": "integration@elo.example", "aud": aud, "exp": exp});
        encode(&Header::new(Algorithm::RS256), &claims, &EncodingKey::from_rsa_pem(key.as_bytes()).unwrap()).unwrap()
    };
    let grant = |jwt: String| {
        org.http
            .post(format!("{}/services/oauth2/token", org.base))
            .form(&[("grant_type", "urn:ietf:params:oauth:grant-type:jwt-bearer".to_owned()), ("assertion", jwt)])
            .send()
    };
    let ok = grant(assertion(&private, "elo-sandbox-client", "https://login.salesforce.com", now + 180)).await.unwrap();
    assert_eq!(ok.status(), 200);
    let body: Value = ok.json().await.unwrap();
    assert_eq!(body["token_type"], "Bearer");
    assert!(body.get("refresh_token").is_none() && body.get("expires_in").is_none());
    let token = body["access_token"].as_str().unwrap();
    let limits =
        org.http.get(format!("{}/services/data/v66.0/limits", org.base)).bearer_auth(token).send().await.unwrap();
    assert_eq!(limits.status(), 200, "the JWT-issued token works");

    for (jwt, error) in [
        (assertion(&other_private, "elo-sandbox-client", "https://login.salesforce.com", now + 180), "invalid_grant"),
        (assertion(&private, "someone-else", "https://login.salesforce.com", now + 180), "invalid_client_id"),
        (assertion(&private, "elo-sandbox-client", "https://evil.example.com", now + 180), "invalid_grant"),
        (assertion(&private, "elo-sandbox-client", "https://test.salesforce.com", now - 10), "invalid_grant"),
        ("not-a-jwt".to_owned(), "invalid_grant"),
    ] {
        let resp = grant(jwt).await.unwrap();
        assert_eq!(resp.status(), 400);
        assert_eq!(resp.json::<Value>().await.unwrap()["error"], error);
    }
    std::fs::remove_dir_all(dir).unwrap();
}
