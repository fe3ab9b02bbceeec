//! RD Station Marketing simulator conformance, written from `../shared/docs/saas-apis.md` §3
//! and §6: auth and token expiry, contact semantics, rate limits, event validation, paging.

mod common;

use common::rdstation::Rd;
use sandbox::rdstation::RdConfig;
use serde_json::{Value, json};

#[tokio::test]
async fn oauth_code_and_refresh_grants_and_token_expiry() {
    let rd = Rd::start(RdConfig::default()).await;
    let dialog = rd
        .http
        .get(format!("{}/auth/dialog?client_id=elo-rd-client&redirect_uri=http://app.local/cb", rd.base))
        .send()
        .await
        .unwrap();
    assert_eq!(dialog.status(), 302);
    let location = dialog.headers()["location"].to_str().unwrap().to_owned();
    let code = location.split("code=").nth(1).unwrap();
    let tokens: Value = rd
        .http
        .post(format!("{}/auth/token", rd.base))
        .json(&json!({"client_id": "elo-rd-client", "client_secret": "elo-rd-secret", "code": code}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(tokens["expires_in"], 86400);
    let refresh = tokens["refresh_token"].as_str().unwrap();
    let reused = rd
        .http
        .post(format!("{}/auth/token", rd.base))
        .json(&json!({"client_id": "elo-rd-client", "client_secret": "elo-rd-secret", "code": code}))
        .send()
        .await
        .unwrap();
    assert_eq!(reused.status(), 401, "a code is single-use");

    let wrong = rd
        .http
        .post(format!("{}/auth/token", rd.base))
        .json(&json!({"client_id": "elo-rd-client", "client_secret": "x", "code": "c"}))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), 401);
    assert_eq!(
        wrong.json::<Value>().await.unwrap(),
        json!({"errors": {"error_type": "ACCESS_DENIED", "error_message": "Wrong credentials provided."}})
    );

    rd.app.sim.lock().unwrap().expire_tokens();
    let (status, headers, body) = rd.send(reqwest::Method::GET, "/platform/segmentations", None).await;
    assert_eq!(status, 401);
    assert!(headers["www-authenticate"].to_str().unwrap().contains(r#"error="expired_token""#), "{headers:?}");
    assert_eq!(body["errors"]["error_type"], "UNAUTHORIZED");

    let refreshed: Value = rd
        .http
        .post(format!("{}/auth/token", rd.base))
        .json(&json!({"client_id": "elo-rd-client", "client_secret": "elo-rd-secret", "refresh_token": refresh}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(refreshed["refresh_token"], refresh, "the Marketing refresh token does not rotate or expire");
    let ok = rd
        .http
        .get(format!("{}/platform/segmentations", rd.base))
        .bearer_auth(refreshed["access_token"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(ok.status(), 200);

    let invalid = rd.http.get(format!("{}/platform/segmentations", rd.base)).bearer_auth("nope").send().await.unwrap();
    assert_eq!(invalid.status(), 401);
    assert!(invalid.headers()["www-authenticate"].to_str().unwrap().contains(r#"error="invalid_token""#));
}

#[tokio::test]
async fn the_25th_patch_of_one_contact_in_24h_is_429() {
    let rd = Rd::start(RdConfig::default()).await;
    for i in 1..=24 {
        let (status, _, body) = rd
            .send(
                reqwest::Method::PATCH,
                "/platform/contacts/email:ana@example.com",
                Some(json!({"name": format!("Ana {i}")})),
            )
            .await;
        assert_eq!(status, 200, "patch {i}: {body}");
    }
    let (status, headers, body) = rd
        .send(reqwest::Method::PATCH, "/platform/contacts/email:ana@example.com", Some(json!({"name": "Ana 25"})))
        .await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["errors"]["error_type"], "RATE_LIMIT_EXCEDDED", "RD's own spelling");
    assert_eq!(body["errors"]["error_message"], "API usage limit exceeded");
    assert!(headers.get("retry-after").is_some());
    let (status, _, _) =
        rd.send(reqwest::Method::PATCH, "/platform/contacts/email:bia@example.com", Some(json!({"name": "Bia"}))).await;
    assert_eq!(status, 200, "the limit is per contact");
}

/// RD counts the 24 PATCHes per contact, not per identifier: switching between `email:` and
/// `uuid:` does not buy a second allowance.
#[tokio::test]
async fn the_patch_limit_counts_the_contact_whichever_identifier_is_used() {
    let rd = Rd::start(RdConfig::default()).await;
    let (status, _, created) = rd
        .send(reqwest::Method::PATCH, "/platform/contacts/email:cris@example.com", Some(json!({"name": "Cris 0"})))
        .await;
    assert_eq!(status, 200, "{created}");
    let uuid = created["uuid"].as_str().unwrap().to_owned();
    for i in 1..24 {
        let path = if i % 2 == 0 {
            "/platform/contacts/email:CRIS@example.com".to_owned()
        } else {
            format!("/platform/contacts/uuid:{uuid}")
        };
        let (status, _, body) =
            rd.send(reqwest::Method::PATCH, &path, Some(json!({"name": format!("Cris {i}")}))).await;
        assert_eq!(status, 200, "patch {i}: {body}");
    }
    let (status, _, body) = rd
        .send(reqwest::Method::PATCH, &format!("/platform/contacts/uuid:{uuid}"), Some(json!({"name": "Cris 24"})))
        .await;
    assert_eq!(status, 429, "the 25th patch of one contact, by uuid after e-mails: {body}");
}

/// An injected 429 looks like RD's own: body and `Retry-After`.
#[tokio::test]
async fn an_injected_429_carries_retry_after() {
    let rd = Rd::start(RdConfig::default()).await;
    rd.app
        .faults
        .set("rdstation", sandbox::faults::FaultConfig { error_rates: [(429, 1.0)].into(), ..Default::default() });
    let (status, headers, body) = rd.send(reqwest::Method::GET, "/platform/contacts/email:x@example.com", None).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["errors"]["error_type"], "RATE_LIMIT_EXCEDDED");
    let after: u64 = headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(after >= 1, "{after}");
}

#[tokio::test]
async fn contact_requests_are_limited_per_account_per_minute() {
    let rd = Rd::start(RdConfig { contacts_per_minute: 120, ..RdConfig::default() }).await;
    for i in 0..120 {
        let (status, _, _) =
            rd.send(reqwest::Method::GET, &format!("/platform/contacts/email:n{i}@example.com"), None).await;
        assert_eq!(status, 404);
    }
    let (status, _, body) = rd.send(reqwest::Method::GET, "/platform/contacts/email:x@example.com", None).await;
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["errors"]["error_type"], "RATE_LIMIT_EXCEDDED", "{body}");
}

#[tokio::test]
async fn upsert_replaces_tags_and_tag_appends() {
    let rd = Rd::start(RdConfig::default()).await;
    let (status, _, created) = rd
        .send(
            reqwest::Method::POST,
            "/platform/contacts",
            Some(json!({"email": "ana@example.com", "name": "Ana", "tags": ["vip", "cliente"]})),
        )
        .await;
    assert_eq!(status, 200, "{created}");
    assert!(created["uuid"].is_string());
    let (status, _, body) = rd
        .send(reqwest::Method::POST, "/platform/contacts", Some(json!({"email": "ana@example.com", "name": "Ana"})))
        .await;
    assert_eq!(status, 400);
    assert_eq!(
        body,
        json!({"errors": {"error_type": "EMAIL_ALREADY_IN_USE", "error_message": "Email already in use."}}),
        "the flat shape"
    );

    let (_, _, patched) = rd
        .send(reqwest::Method::PATCH, "/platform/contacts/email:ana@example.com", Some(json!({"tags": ["novo"]})))
        .await;
    assert_eq!(patched["tags"], json!(["novo"]), "PATCH replaces the tag list");
    let (_, _, tagged) = rd
        .send(reqwest::Method::POST, "/platform/contacts/email:ana@example.com/tag", Some(json!({"tags": ["vip"]})))
        .await;
    assert_eq!(tagged["tags"], json!(["novo", "vip"]), "/tag appends");
    let (status, _, body) = rd
        .send(reqwest::Method::POST, "/platform/contacts/email:ghost@example.com/tag", Some(json!({"tags": ["x"]})))
        .await;
    assert_eq!(status, 404);
    assert_eq!(body, json!({"errors": {"error_type": "RESOURCE_NOT_FOUND", "error_message": "Lead not found."}}));
    let (status, _, body) = rd
        .send(
            reqwest::Method::PATCH,
            "/platform/contacts/email:ana@example.com",
            Some(json!({"email": "other@example.com"})),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(body["errors"]["error_type"], "CONFLICTING_FIELD");

    let uuid = created["uuid"].as_str().unwrap();
    let (status, _, funnel) = rd
        .send(
            reqwest::Method::PUT,
            &format!("/platform/contacts/uuid:{uuid}/funnels/default"),
            Some(json!({"lifecycle_stage": "Client", "opportunity": true})),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(funnel["lifecycle_stage"], "Client");
    let (status, _, body) = rd
        .send(
            reqwest::Method::PUT,
            &format!("/platform/contacts/uuid:{uuid}/funnels/default"),
            Some(json!({"lifecycle_stage": "Customer"})),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(body["errors"][0]["error_type"], "INVALID_OPTION");
}

#[tokio::test]
async fn events_are_validated_by_type_and_limited_to_0_2_mb() {
    let rd = Rd::start(RdConfig::default()).await;
    let (status, _, body) = rd
        .send(
            reqwest::Method::POST,
            "/platform/events",
            Some(json!({"event_type": "BOGUS", "event_family": "CDP", "payload": {}})),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(body["errors"][0]["error_type"], "INVALID_OPTION");
    assert_eq!(body["errors"][0]["path"], "$.body.event_type");
    let options: Vec<&str> = body["errors"][0]["validation_rules"]["valid_options"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    assert!(options.contains(&"ECOMMERCE_ORDER_PLACED") && !options.contains(&"ORDER_PLACED"), "{options:?}");

    let big = json!({"event_type": "CONVERSION", "event_family": "CDP", "payload": {"conversion_identifier": "x", "email": "a@b.c", "cf_blob": "x".repeat(210 * 1024)}});
    let (status, _, _) = rd.send(reqwest::Method::POST, "/platform/events", Some(big)).await;
    assert_eq!(status, 413);

    let resp = rd
        .http
        .post(format!("{}/platform/events", rd.base))
        .bearer_auth(&rd.token)
        .header("content-type", "text/plain")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 415);
    assert_eq!(resp.json::<Value>().await.unwrap()["errors"]["error_type"], "UNSUPPORTED_MEDIA_TYPE");

    let conversion = json!({"event_type": "CONVERSION", "event_family": "CDP", "payload": {"conversion_identifier": "checkout", "email": "new@example.com"}});
    let by_key = rd
        .http
        .post(format!("{}/platform/conversions?api_key=elo-rd-api-key", rd.base))
        .json(&conversion)
        .send()
        .await
        .unwrap();
    assert_eq!(by_key.status(), 200);
    let bad_key =
        rd.http.post(format!("{}/platform/conversions?api_key=nope", rd.base)).json(&conversion).send().await.unwrap();
    assert_eq!(bad_key.status(), 401);
    let (status, _, contact) = rd.send(reqwest::Method::GET, "/platform/contacts/email:new@example.com", None).await;
    assert_eq!(status, 200, "a conversion creates the contact: {contact}");
}

#[tokio::test]
async fn segmentations_page_with_headers_and_cap_page_size_at_125() {
    let rd = Rd::start(RdConfig { contacts_per_minute: 1000, ..RdConfig::default() }).await;
    for i in 0..30 {
        rd.send(reqwest::Method::POST, "/platform/contacts", Some(json!({"email": format!("c{i}@example.com"), "tags": if i % 2 == 0 { json!(["vip"]) } else { json!([]) }}))).await;
    }
    rd.app.sim.lock().unwrap().segmentations.push(sandbox::rdstation::Segmentation {
        id: 2,
        name: "VIP".into(),
        standard: false,
        tag: Some("vip".into()),
    });
    let (status, headers, body) = rd.send(reqwest::Method::GET, "/platform/segmentations", None).await;
    assert_eq!(status, 200);
    assert_eq!(body["segmentations"].as_array().unwrap().len(), 2);
    assert_eq!(headers["pagination-total-rows"], "2");
    let (_, headers, body) =
        rd.send(reqwest::Method::GET, "/platform/segmentations/2/contacts?page=2&page_size=10", None).await;
    assert_eq!(headers["pagination-total-rows"], "15");
    assert_eq!(headers["pagination-page"], "2");
    assert_eq!(headers["pagination-page-size"], "10");
    assert_eq!(body["contacts"].as_array().unwrap().len(), 5);
    let (status, _, body) =
        rd.send(reqwest::Method::GET, "/platform/segmentations/1/contacts?page_size=126", None).await;
    assert_eq!(status, 400, "{body}");
}
