//! A `RESEND` makes a repair land: an order deleted in Salesforce behind Elo's back is not
//! rewritten by a republish of the version the sink confirmed (it is skipped as already
//! applied, without a call) until a RESEND marked that confirmation for rewriting; older
//! versions stay skipped all along.

use std::time::Duration;

use elo_events::{CommandType, IntegrationCommand, OutcomeStatus};
use salesforce_sink::client::{AuthFlow, ClientConfig, SalesforceClient};
use salesforce_sink::handler::Sink;
use salesforce_sink::mapping::Mapping;
use sandbox::salesforce::{SalesforceApp, SalesforceConfig};

async fn serve() -> (SalesforceApp, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let app = SalesforceApp::new(
        SalesforceConfig { instance_url: url.clone(), ..SalesforceConfig::default() },
        Default::default(),
        Default::default(),
    );
    let router = app.clone().router();
    tokio::spawn(async move { axum::serve(listener, router).await });
    (app, url)
}

async fn sink(url: &str) -> Sink {
    let client = SalesforceClient::new(ClientConfig {
        login_url: url.into(),
        api_version: "v66.0".into(),
        auth: AuthFlow::ClientCredentials {
            client_id: "elo-sandbox-client".into(),
            client_secret: "elo-sandbox-secret".into(),
        },
        request_timeout: Duration::from_secs(10),
        max_concurrent: 2,
        quota_reserve_percent: 0,
        quota_warn_hours: 4.0,
        quota_probe_every: Duration::from_secs(3600),
    })
    .unwrap();
    let mapping = Mapping::default().resolve().unwrap();
    let org = salesforce_sink::setup::check(&client, &mapping).await.unwrap().unwrap();
    Sink::new(client, mapping, org, Duration::from_secs(30))
}

fn order_id(app: &SalesforceApp, external: &str) -> Option<String> {
    let sim = app.sim.lock().unwrap();
    sim.org
        .records
        .iter()
        .find(|(_, r)| r.object == "Order" && r.fields["Elo_Id__c"] == external)
        .map(|(id, _)| id.clone())
}

fn resend(target: &str, entity: &str, key: &str) -> IntegrationCommand {
    IntegrationCommand {
        command_id: "r1".into(),
        command_type: CommandType::Resend,
        target_service: target.into(),
        customer_key: key.into(),
        entity_id: entity.into(),
        store_id: Some(1),
        reason: "drift".into(),
        requested_by: "reconciler".into(),
        requested_at: 0,
    }
}

#[tokio::test]
async fn a_resend_rewrites_an_order_deleted_behind_the_sinks_back() {
    let (app, url) = serve().await;
    let sink = sink(&url).await;
    let event = elo_events::sample::order_placed(3);
    let id = event.order.as_ref().unwrap().entity_id;
    let (external, entity) = (format!("o:{id}"), format!("order:{id}"));
    let verdicts = sink.apply(&[Ok(event.clone())]).await;
    assert!(verdicts[0].result.is_ok(), "{:?}", verdicts[0].result);
    let first = order_id(&app, &external).expect("the order landed");

    // Deleted behind Elo's back: the same version republished is skipped, no call made.
    app.sim.lock().unwrap().org.remove_record(&first);
    let before = app.sim.lock().unwrap().api_usage;
    let verdicts = sink.apply(&[Ok(event.clone())]).await;
    assert_eq!(verdicts[0].outcome, Some(OutcomeStatus::Applied));
    assert_eq!(app.sim.lock().unwrap().api_usage, before, "an equal version costs no call");
    assert_eq!(order_id(&app, &external), None, "so without a RESEND the repair would not land");

    // Another sink's RESEND is not ours; ours marks the confirmation and asks order-ingest to
    // refetch.
    let now = 1_000;
    assert_eq!(
        salesforce_sink::resend::plan(&resend("rdstation-sink", &entity, &event.customer_key), now).unwrap(),
        None
    );
    let (key, refetch) = salesforce_sink::resend::plan(&resend("salesforce-sink", &entity, &event.customer_key), now)
        .unwrap()
        .expect("a refetch for order-ingest");
    assert_eq!(
        (refetch.command_type, refetch.target_service.as_str(), refetch.entity_id.as_str()),
        (CommandType::RefetchOrder, "order-ingest", id.to_string().as_str())
    );
    assert!(sink.request_rewrite(0, &key).await.unwrap(), "there was a confirmation to mark");

    // A late older version (a duplicate webhook, a replayed dead letter) arriving before the
    // refetch must not be written: the confirmed version is kept, only its equal is rewritten.
    let mut older = event.clone();
    older.event_id = "older".into();
    older.source_version.updated_at -= 60_000;
    let verdicts = sink.apply(&[Ok(older)]).await;
    assert_eq!(verdicts[0].outcome, Some(OutcomeStatus::SkippedStale));
    assert_eq!(order_id(&app, &external), None, "an older version never lands after a RESEND");

    let verdicts = sink.apply(&[Ok(event.clone())]).await;
    assert!(verdicts[0].result.is_ok(), "{:?}", verdicts[0].result);
    assert_eq!(verdicts[0].outcome, Some(OutcomeStatus::Applied));
    assert!(order_id(&app, &external).is_some(), "the republished version is written again");

    // The mark is spent: the same version again is a redelivery, no call.
    let before = app.sim.lock().unwrap().api_usage;
    sink.apply(&[Ok(event)]).await;
    assert_eq!(app.sim.lock().unwrap().api_usage, before, "rewritten once, not on every redelivery");

    let bad = salesforce_sink::resend::plan(&resend("salesforce-sink", "3", "c:1"), now).unwrap_err();
    assert_eq!((bad.class, bad.code.as_str()), (elo_kafka::ErrorClass::Permanent, "invalid_resend"));
}

fn order_field(app: &SalesforceApp, external: &str, field: &str) -> Option<serde_json::Value> {
    let sim = app.sim.lock().unwrap();
    sim.org
        .records
        .values()
        .find(|r| r.object == "Order" && r.fields["Elo_Id__c"] == external)
        .map(|r| r.fields[field].clone())
}

#[tokio::test]
async fn a_resend_never_lets_an_older_version_overwrite_a_newer_one() {
    let (app, url) = serve().await;
    let sink = sink(&url).await;
    let old = elo_events::sample::order_placed(5);
    let id = old.order.as_ref().unwrap().entity_id;
    let mut new = old.clone();
    new.source_version.updated_at += 100_000;
    new.order.as_mut().unwrap().status = "complete".into();
    let external = format!("o:{id}");
    assert!(sink.apply(&[Ok(new.clone())]).await[0].result.is_ok());
    assert_eq!(order_field(&app, &external, "Magento_Status__c"), Some(serde_json::json!("complete")));

    // The RESEND is executed; a late duplicate (or DLQ replay) of the older version follows.
    let (key, _) =
        salesforce_sink::resend::plan(&resend("salesforce-sink", &format!("order:{id}"), &old.customer_key), 1)
            .unwrap()
            .expect("a refetch");
    assert!(sink.request_rewrite(0, &key).await.unwrap());
    let verdicts = sink.apply(&[Ok(old)]).await;
    assert_eq!(verdicts[0].outcome, Some(OutcomeStatus::SkippedStale));
    assert_eq!(
        order_field(&app, &external, "Magento_Status__c"),
        Some(serde_json::json!("complete")),
        "the newer version stays"
    );
    // The refetched (current) version is still written again once.
    let before = app.sim.lock().unwrap().api_usage;
    assert!(sink.apply(&[Ok(new.clone())]).await[0].result.is_ok());
    assert!(app.sim.lock().unwrap().api_usage > before, "the equal version is rewritten after a RESEND");
    let before = app.sim.lock().unwrap().api_usage;
    assert!(sink.apply(&[Ok(new)]).await[0].result.is_ok());
    assert_eq!(app.sim.lock().unwrap().api_usage, before, "the rewrite mark is one-shot");
}

#[tokio::test]
async fn a_resend_keeps_the_erasure_floor() {
    let (app, url) = serve().await;
    let sink = sink(&url).await;
    let mut changed = elo_events::sample::order_placed(4);
    changed.event_type = elo_events::CommerceEventType::CustomerChanged;
    changed.order = None;
    changed.source_version.entity_type = "customer".into();
    assert!(sink.apply(&[Ok(changed.clone())]).await[0].result.is_ok());
    let mut erased = changed.clone();
    erased.event_type = elo_events::CommerceEventType::CustomerErased;
    erased.customer = None;
    erased.source_version.updated_at += 60_000;
    assert!(sink.apply(&[Ok(erased.clone())]).await[0].result.is_ok());
    let email = |app: &SalesforceApp| {
        let sim = app.sim.lock().unwrap();
        sim.org
            .records
            .values()
            .filter(|r| r.object == "Contact" || r.object == "Account")
            .any(|r| r.fields.values().any(|v| v.as_str().is_some_and(|s| s.contains('@'))))
    };
    assert!(!email(&app), "erased");

    // A RESEND sent before the erasure, processed after it, then the pre-erasure version.
    let entity = format!("customer:{}", changed.customer_key);
    let (key, _) = salesforce_sink::resend::plan(&resend("salesforce-sink", &entity, &changed.customer_key), 1)
        .unwrap()
        .expect("a refetch");
    sink.request_rewrite(0, &key).await.unwrap();
    let verdicts = sink.apply(&[Ok(changed)]).await;
    assert_eq!(verdicts[0].outcome, Some(OutcomeStatus::SkippedStale));
    assert!(!email(&app), "no personal data written again after the erasure");
}
