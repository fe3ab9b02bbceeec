//! Salesforce API limits and protocol details from saas-apis.md §7: the Composite cap on
//! Collections/query subrequests, one upload per Bulk 2.0 job and its declared line ending,
//! the identity URL, the concurrency limit on long-running requests, and `totalSize`.

mod common;

use std::time::Duration;

use common::salesforce::{Org, error_code};
use reqwest::Method;
use sandbox::salesforce::SalesforceConfig;
use serde_json::{Value, json};

#[tokio::test]
async fn composite_takes_at_most_5_collections_or_query_subrequests() {
    let org = Org::start(SalesforceConfig::default()).await;
    let query = |i: usize| json!({"method": "GET", "url": "/services/data/v66.0/query?q=SELECT+Id+FROM+Account", "referenceId": format!("q{i}")});
    let collection = json!({"method": "POST", "url": "/services/data/v66.0/composite/sobjects", "referenceId": "c",
        "body": {"records": [{"attributes": {"type": "Account"}, "Name": "x"}]}});
    let create = |i: usize| json!({"method": "POST", "url": "/services/data/v66.0/sobjects/Account", "referenceId": format!("a{i}"), "body": {"Name": format!("A{i}")}});

    let mut five: Vec<Value> = (0..4).map(query).collect();
    five.push(collection.clone());
    five.extend((0..20).map(create));
    let (s, b) = org.post("/composite", json!({"compositeRequest": five})).await;
    assert_eq!(s, 200, "25 subrequests, 5 of them heavy: {b}");
    assert!(b["compositeResponse"].as_array().unwrap().iter().all(|r| r["httpStatusCode"].as_u64().unwrap() < 300));

    let mut six: Vec<Value> = (0..5).map(query).collect();
    six.push(collection);
    let (s, b) = org.post("/composite", json!({"compositeRequest": six})).await;
    assert_eq!((s.as_u16(), error_code(&b)), (400, "INVALID_INPUT"), "{b}");
}

async fn upload(org: &Org, id: &str, csv: &'static str) -> u16 {
    org.http
        .put(format!("{}/services/data/v66.0/jobs/ingest/{id}/batches", org.base))
        .bearer_auth(&org.token)
        .header("content-type", "text/csv")
        .body(csv)
        .send()
        .await
        .unwrap()
        .status()
        .as_u16()
}

async fn new_job(org: &Org, line_ending: &str) -> String {
    let (s, job) = org
        .post(
            "/jobs/ingest",
            json!({"object": "Account", "operation": "insert", "contentType": "CSV", "lineEnding": line_ending}),
        )
        .await;
    assert_eq!(s, 200, "{job}");
    job["id"].as_str().unwrap().to_owned()
}

async fn job_state(org: &Org, id: &str) -> Value {
    for _ in 0..5 {
        let (_, _, info) = org.call(Method::GET, &format!("/jobs/ingest/{id}"), None).await;
        if ["JobComplete", "Failed", "Aborted"].contains(&info["state"].as_str().unwrap()) {
            return info;
        }
    }
    panic!("job {id} did not finish")
}

#[tokio::test]
async fn bulk_jobs_take_one_upload_and_their_declared_line_ending() {
    let org = Org::start(SalesforceConfig::default()).await;
    let id = new_job(&org, "LF").await;
    assert_eq!(upload(&org, &id, "Name\nFirst\n").await, 201);
    assert_eq!(upload(&org, &id, "Name\nSecond\n").await, 201, "the second PUT is accepted...");
    let (s, b) = org.patch(&format!("/jobs/ingest/{id}"), json!({"state": "UploadComplete"})).await;
    assert_eq!((s.as_u16(), error_code(&b)), (400, "INVALIDJOB"), "...and the job fails on close");
    assert!(b[0]["message"].as_str().unwrap().starts_with("Found multiple contents for job"), "{b}");
    let (_, _, info) = org.call(Method::GET, &format!("/jobs/ingest/{id}"), None).await;
    assert_eq!(info["state"], "Failed");

    let crlf_data = new_job(&org, "LF").await;
    assert_eq!(upload(&org, &crlf_data, "Name\r\nWindows\r\n").await, 201);
    org.patch(&format!("/jobs/ingest/{crlf_data}"), json!({"state": "UploadComplete"})).await;
    let info = job_state(&org, &crlf_data).await;
    assert_eq!(info["state"], "Failed", "{info}");
    assert_eq!(
        info["errorMessage"],
        "ClientInputError : LineEnding is invalid on user data. Current LineEnding setting is LF"
    );

    let crlf = new_job(&org, "CRLF").await;
    assert_eq!(upload(&org, &crlf, "Name\r\n\"Multi\nline\"\r\nOk\r\n").await, 201);
    org.patch(&format!("/jobs/ingest/{crlf}"), json!({"state": "UploadComplete"})).await;
    let info = job_state(&org, &crlf).await;
    assert_eq!(info["state"], "JobComplete", "line breaks inside quotes are data: {info}");
    assert_eq!(info["numberRecordsProcessed"], 2);
}

#[tokio::test]
async fn the_token_id_is_an_identity_url_served_with_18_character_ids() {
    let org = Org::start(SalesforceConfig::default()).await;
    let token: Value = org
        .http
        .post(format!("{}/services/oauth2/token", org.base))
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
    let id_url = token["id"].as_str().unwrap();
    let ids: Vec<&str> = id_url.rsplitn(3, '/').take(2).collect();
    let (user, org_id) = (ids[0], ids[1]);
    assert!(id_url.starts_with(&format!("{}/id/", org.base)), "{id_url}");
    assert!(org_id.starts_with("00D") && org_id.len() == 18, "{org_id}");
    assert!(user.starts_with("005") && user.len() == 18, "{user}");
    let access = token["access_token"].as_str().unwrap();
    let me: Value = org.http.get(id_url).bearer_auth(access).send().await.unwrap().json().await.unwrap();
    assert_eq!((me["organization_id"].as_str(), me["user_id"].as_str()), (Some(org_id), Some(user)));
    assert_eq!(me["id"], id_url);
    assert!(me["urls"]["rest"].as_str().unwrap().starts_with(&org.base));
    let anonymous = org.http.get(id_url).send().await.unwrap();
    assert_eq!(anonymous.status(), 403);
    assert_eq!(anonymous.text().await.unwrap(), "Bad_OAuth_Token");
}

#[tokio::test]
async fn only_long_running_requests_count_against_the_concurrency_limit() {
    let org =
        Org::start(SalesforceConfig { max_concurrent: 2, long_running_ms: 300, ..SalesforceConfig::default() }).await;
    let slow = json!({"endpoints": {"GET /services/data/{version}/limits": {"latency_fixed_ms": 1200}}});
    let r = org.http.put(format!("{}/faults/salesforce", org.control)).json(&slow).send().await.unwrap();
    assert_eq!(r.status(), 200);
    // Five calls at once that will each take 1.2 s: none is long-running when it arrives.
    let burst = futures::future::join_all((0..5).map(|_| org.call(Method::GET, "/limits", None))).await;
    assert!(burst.iter().all(|(s, _, _)| s.as_u16() == 200), "{:?}", burst.iter().map(|r| r.0).collect::<Vec<_>>());

    // Two calls that have been running past the threshold block a third.
    let long = tokio::spawn({
        let (http, base, token) = (org.http.clone(), org.base.clone(), org.token.clone());
        async move {
            let call = || http.get(format!("{base}/services/data/v66.0/limits")).bearer_auth(&token).send();
            let (a, b) = tokio::join!(call(), call());
            (a.unwrap().status().as_u16(), b.unwrap().status().as_u16())
        }
    });
    tokio::time::sleep(Duration::from_millis(600)).await;
    let (s, headers, b) = org.call(Method::GET, "/sobjects", None).await;
    assert_eq!((s.as_u16(), error_code(&b)), (403, "REQUEST_LIMIT_EXCEEDED"));
    assert!(headers.contains_key("sforce-limit-info"));
    assert_eq!(long.await.unwrap(), (200, 200));
    let (s, _, _) = org.call(Method::GET, "/sobjects", None).await;
    assert_eq!(s, 200, "free again once they finished");
}

#[tokio::test]
async fn query_more_reports_the_size_of_the_whole_result() {
    let org = Org::start(SalesforceConfig::default()).await;
    let records: Vec<Value> = (0..450)
        .map(|i| json!({"attributes": {"type": "Account"}, "Elo_Id__c": format!("t{i}"), "Name": "n"}))
        .collect();
    for chunk in records.chunks(200) {
        assert_eq!(org.patch("/composite/sobjects/Account/Elo_Id__c", json!({"records": chunk})).await.0, 200);
    }
    let mut url = format!("{}/services/data/v66.0/query?q=SELECT+Id+FROM+Account", org.base);
    let mut pages = 0;
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
        pages += 1;
        assert_eq!(page["totalSize"], 450, "page {pages}");
        match page["nextRecordsUrl"].as_str() {
            Some(next) => url = format!("{}{next}", org.base),
            None => break,
        }
    }
    assert_eq!(pages, 3);
}
