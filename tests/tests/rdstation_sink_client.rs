//! rdstation-sink's RD Station client and contact writes against the RD simulator (no broker):
//! OAuth refresh on an expired token, 429 with `Retry-After` classified as a rate limit, the
//! per-account budget, tags set outside Elo surviving, an e-mail change updating the same
//! contact, coalescing, and the custom fields created at startup.

use std::num::NonZeroU32;
use std::sync::atomic::AtomicU32;
use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};

use futures::future::BoxFuture;

use elo_integration_tests::proxy::{CountingProxy, counting_proxy, max_in_window};
use elo_integration_tests::{rd_refresh_token, serve_rdstation};
use elo_kafka::ErrorClass;
use rdstation_sink::aggregates::CustomerState;
use rdstation_sink::client::{Budget, Error, RdClient, RdSettings};
use rdstation_sink::contacts;
use rdstation_sink::rules::Rules;
use reqwest::Method;
use sandbox::rdstation::{RdConfig, RdStationApp};
use serde_json::{Value, json};

async fn client(rd: &RdStationApp, url: &str, per_minute: u32) -> RdClient {
    let refresh = rd_refresh_token(rd, url).await;
    RdClient::new(RdSettings {
        base_url: url.to_owned(),
        client_id: "elo-rd-client".into(),
        client_secret: "elo-rd-secret".into(),
        refresh_token: Some(refresh),
        sandbox_control: None,
        contacts_per_minute: NonZeroU32::new(per_minute).unwrap(),
        request_timeout: Duration::from_secs(5),
    })
    .unwrap()
}

fn contact(rd: &RdStationApp, email: &str) -> Option<Value> {
    let sim = rd.sim.lock().unwrap();
    sim.contacts.values().find(|c| c.fields.get("email").and_then(Value::as_str) == Some(email)).map(|c| {
        let mut v = Value::Object(c.fields.clone());
        v["uuid"] = json!(c.uuid);
        v["funnel"] = c.funnel.clone();
        v
    })
}

fn tags(contact: &Value) -> Vec<String> {
    let mut t: Vec<String> =
        contact["tags"].as_array().into_iter().flatten().filter_map(Value::as_str).map(str::to_owned).collect();
    t.sort();
    t
}

#[tokio::test]
async fn an_expired_token_is_refreshed_once_and_the_call_goes_through() {
    let (rd, url) = serve_rdstation(RdConfig::default()).await;
    let client = client(&rd, &url, 6000).await;
    client.request(Method::GET, "/platform/contacts/fields", None, Budget::Contacts).await.unwrap();
    rd.sim.lock().unwrap().expire_tokens();
    let fields = client.request(Method::GET, "/platform/contacts/fields", None, Budget::Contacts).await.unwrap();
    assert!(fields["fields"].as_array().is_some_and(|f| !f.is_empty()));
    let counters = rd.counters.snapshot();
    assert_eq!(counters["rdstation"]["POST /auth/token"], 3, "code grant, first token, one refresh: {counters}");
    assert_eq!(counters["rdstation"]["GET /platform/contacts/{id}"], 3, "one call refused, then retried once");
}

#[tokio::test]
async fn a_bad_refresh_token_is_an_auth_failure_not_a_drop() {
    let (_rd, url) = serve_rdstation(RdConfig::default()).await;
    let client = RdClient::new(RdSettings {
        base_url: url,
        client_id: "elo-rd-client".into(),
        client_secret: "elo-rd-secret".into(),
        refresh_token: Some("not-a-token".into()),
        sandbox_control: None,
        contacts_per_minute: NonZeroU32::new(600).unwrap(),
        request_timeout: Duration::from_secs(5),
    })
    .unwrap();
    let error = client.request(Method::GET, "/platform/contacts/fields", None, Budget::Contacts).await.unwrap_err();
    assert_eq!(error.class(), ErrorClass::Auth, "{error}");
    assert_eq!(error.code(), "INVALID_REFRESH_TOKEN");
}

#[tokio::test]
async fn a_429_is_a_rate_limit_with_rd_retry_after() {
    let (rd, url) = serve_rdstation(RdConfig { contacts_per_minute: 2, ..RdConfig::default() }).await;
    let client = client(&rd, &url, 6000).await;
    for _ in 0..2 {
        client.request(Method::GET, "/platform/contacts/fields", None, Budget::Contacts).await.unwrap();
    }
    let error = client.request(Method::GET, "/platform/contacts/fields", None, Budget::Contacts).await.unwrap_err();
    let Error::RateLimited { retry_after: Some(after) } = &error else { panic!("expected a rate limit, got {error}") };
    assert!(*after >= Duration::from_secs(1) && *after <= Duration::from_secs(60), "{after:?}");
    let handler_error = error.to_handler_error();
    assert_eq!(handler_error.class, ErrorClass::RateLimited);
    assert_eq!(handler_error.retry_after, Some(*after));
}

#[tokio::test]
async fn the_budget_holds_contact_requests_to_its_limit_per_window_but_not_events() {
    let (rd, url) = serve_rdstation(RdConfig { contacts_per_minute: 10_000, ..RdConfig::default() }).await;
    let client = client(&rd, &url, 5).await;
    for _ in 0..5 {
        client.request(Method::GET, "/platform/contacts/fields", None, Budget::Contacts).await.unwrap();
    }
    let error = client
        .only_if_free()
        .request(Method::GET, "/platform/contacts/fields", None, Budget::Contacts)
        .await
        .unwrap_err();
    assert!(matches!(error, Error::BudgetSpent), "a sixth contact request in the minute: {error}");
    let started = Instant::now();
    for _ in 0..5 {
        let _ = client.request(Method::GET, "/platform/segmentations", None, Budget::None).await;
    }
    assert!(started.elapsed() < Duration::from_secs(5), "unbudgeted requests do not wait for the budget");
}

/// The client's calls to the simulator go through a counting proxy (`per_minute` budget).
async fn proxied(per_minute: u32, rd_limit: usize, concurrency: usize) -> (RdStationApp, CountingProxy, RdClient) {
    let (rd, url) = serve_rdstation(RdConfig { contacts_per_minute: rd_limit, ..RdConfig::default() }).await;
    let proxy = counting_proxy(&url).await;
    let refresh = rd_refresh_token(&rd, &proxy.url).await;
    let client = RdClient::with_concurrency(
        RdSettings {
            base_url: proxy.url.clone(),
            client_id: "elo-rd-client".into(),
            client_secret: "elo-rd-secret".into(),
            refresh_token: Some(refresh),
            sandbox_control: None,
            contacts_per_minute: NonZeroU32::new(per_minute).unwrap(),
            request_timeout: Duration::from_secs(20),
        },
        concurrency,
    )
    .unwrap();
    (rd, proxy, client)
}

/// M3: RD's 429 pauses the whole account, not only the call that got it: no request (contact
/// or event, waiting or not) reaches RD again before its `Retry-After`.
#[tokio::test]
async fn a_429_pauses_every_request_of_the_account_for_its_retry_after() {
    let (_rd, proxy, client) = proxied(6000, 2, 8).await;
    for _ in 0..2 {
        client.request(Method::GET, "/platform/contacts/fields", None, Budget::Contacts).await.unwrap();
    }
    let error = client.request(Method::GET, "/platform/contacts/fields", None, Budget::Contacts).await.unwrap_err();
    let Error::RateLimited { retry_after: Some(after) } = error else { panic!("expected a 429, got {error}") };
    assert!(after >= Duration::from_secs(2), "RD asks to wait {after:?}");
    assert_eq!(proxy.calls(), 3);
    // A batch's contact write does not go out: it is deferred.
    let batch = client.without_waiting();
    let result = batch.request(Method::GET, "/platform/contacts/fields", None, Budget::Contacts).await;
    assert!(matches!(result, Err(Error::BudgetSpent)), "a non-waiting contact request during the pause: {result:?}");
    // A waiting one, and an event, wait for the pause instead of meeting another 429.
    let waiting = client.request(Method::GET, "/platform/contacts/fields", None, Budget::Contacts);
    assert!(tokio::time::timeout(Duration::from_secs(1), waiting).await.is_err(), "a contact request went out");
    let event = client.request(Method::GET, "/platform/segmentations", None, Budget::None);
    assert!(tokio::time::timeout(Duration::from_secs(1), event).await.is_err(), "an event went out");
    assert_eq!(proxy.calls(), 3, "nothing reached RD during its Retry-After: {:?}", proxy.log());
}

/// M4: counted where RD counts (at the proxy, on arrival), the account never exceeds its
/// budget in any rolling minute, even when requests admitted by the budget queue behind a
/// slow one (one connection; the first answer takes 5 s). Takes a little over a minute: a
/// window has to be filled and passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rd_never_sees_more_than_the_budget_in_a_rolling_minute_when_requests_queue() {
    const BUDGET: u32 = 60;
    const REQUESTS: usize = 62;
    let (_rd, proxy, client) = proxied(BUDGET, 10_000, 1).await;
    proxy.hold(1, Duration::from_secs(5));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let tasks: Vec<_> = (0..8)
        .map(|_| {
            let (client, done) = (client.clone(), done.clone());
            tokio::spawn(async move {
                while done.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < REQUESTS {
                    client.request(Method::GET, "/platform/contacts/fields", None, Budget::Contacts).await.unwrap();
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.unwrap();
    }
    let arrivals: Vec<Instant> = proxy.log().iter().map(|c| c.at).collect();
    assert_eq!(arrivals.len(), REQUESTS);
    let most = max_in_window(&arrivals, Duration::from_secs(60));
    assert!(most <= BUDGET as usize, "RD saw {most} contact requests in a rolling minute (budget {BUDGET})");
}

/// M5: the sweep reserves a contact's requests before it takes the partition's lock; a
/// contact needing more than it reserved (a batch changed it meanwhile) must not wait for the
/// budget under the lock: it fails at once (the contact stays deferred), with nothing sent.
#[tokio::test]
async fn the_sweeps_client_never_waits_for_the_budget_beyond_its_reservation() {
    let (_rd, proxy, client) = proxied(1, 10_000, 8).await;
    let sweep = client.reserving();
    sweep.reserve().await;
    sweep.request(Method::GET, "/platform/contacts/fields", None, Budget::Contacts).await.unwrap();
    let more = sweep.request(Method::GET, "/platform/contacts/fields", None, Budget::Contacts);
    match tokio::time::timeout(Duration::from_secs(5), more).await {
        Ok(Err(Error::BudgetSpent)) => {}
        Ok(other) => panic!("expected BudgetSpent, got {other:?}"),
        Err(_) => panic!("the sweep waited for the budget (a minute at 1/min) while holding the lock"),
    }
    assert_eq!(proxy.calls(), 1);
}

/// M8: a contact write that RD may have applied (sent, then a 5xx) counts against the
/// contact's budget: the client reports it sent, whatever the answer.
#[tokio::test]
async fn a_contact_write_that_failed_after_it_was_sent_still_counts() {
    let (rd, proxy, client) = proxied(6000, 10_000, 8).await;
    let patch = sandbox::faults::FaultConfig { error_rate: 1.0, ..Default::default() };
    let faults = sandbox::faults::FaultConfig {
        endpoints: [("PATCH /platform/contacts/{id}".to_owned(), patch)].into(),
        ..Default::default()
    };
    rd.faults.set("rdstation", faults);
    let mut state = CustomerState::default();
    state.apply(&elo_events::sample::order_placed(1));
    let aggregate = state.aggregate(rdstation_sink_now());
    let desired = contacts::desired(&state, &aggregate, &Rules::default().evaluate(&aggregate));
    let batch = client.without_waiting();
    let error = contacts::sync(&batch, &mut state, &desired, &|_| Box::pin(async { Ok(()) }), &TestTagPosts::new(true))
        .await
        .unwrap_err();
    assert_eq!(error.class(), ErrorClass::Transient, "{error}");
    assert_eq!(proxy.log().iter().filter(|c| c.method == "PATCH").count(), 1);
    assert_eq!(batch.writes_sent(), 1, "the failed PATCH counts: RD may have applied it");
}

fn rules() -> Rules {
    Rules::parse(
        "[[rule]]\nname = \"buyer\"\nwhen = { frequency_gte = 1 }\ntags = [\"buyer\"]\nstage = \"Qualified Lead\"\nfields = { cf_elo_segment = \"buyer\" }\n\n[[rule]]\nname = \"repeat\"\nwhen = { frequency_gte = 2 }\ntags = [\"repeat\"]\n",
        "test",
    )
    .unwrap()
}

async fn sync(client: &RdClient, state: &mut CustomerState, rules: &Rules) -> usize {
    sync_with_tag_posts(client, state, rules, &TestTagPosts::new(true)).await.unwrap()
}

/// A partition's tag posts for a test: posts left or none, and what was taken and given back.
struct TestTagPosts {
    left: bool,
    taken: AtomicU32,
    given_back: AtomicU32,
}

impl TestTagPosts {
    fn new(left: bool) -> Self {
        Self { left, taken: AtomicU32::new(0), given_back: AtomicU32::new(0) }
    }
}

impl contacts::TagPosts for TestTagPosts {
    fn left(&self) -> bool {
        self.left
    }

    fn take(&self) -> BoxFuture<'_, rdstation_sink::client::Result<Option<i64>>> {
        if self.left {
            self.taken.fetch_add(1, SeqCst);
        }
        Box::pin(async move { Ok(self.left.then_some(7)) })
    }

    fn give_back(&self, hour: i64) -> BoxFuture<'_, rdstation_sink::client::Result<()>> {
        assert_eq!(hour, 7, "given back to another hour than the post's");
        self.given_back.fetch_add(1, SeqCst);
        Box::pin(async { Ok(()) })
    }
}

async fn sync_with_tag_posts(
    client: &RdClient,
    state: &mut CustomerState,
    rules: &Rules,
    tag_posts: &TestTagPosts,
) -> rdstation_sink::client::Result<usize> {
    let aggregate = state.aggregate(rdstation_sink_now());
    let desired = contacts::desired(state, &aggregate, &rules.evaluate(&aggregate));
    let persist = |_| -> BoxFuture<'_, rdstation_sink::client::Result<()>> { Box::pin(async { Ok(()) }) };
    contacts::sync(client, state, &desired, &persist, tag_posts).await
}

/// Past the partition's daily share of tag posts (RD: 15,000 per account per day), tags still
/// land, through a read and one PATCH carrying fields and tags (RD allows 24 PATCHes per contact
/// a day: a sync never sends two). A contact whose uuid Elo does not know yet is upserted
/// first (its stage too) and its tags wait for the next sync. No tag post reaches RD; others'
/// tags survive.
#[tokio::test]
async fn with_the_days_tag_posts_spent_tags_land_through_one_patch_per_sync_and_outside_tags_survive() {
    let (rd, url) = serve_rdstation(RdConfig { tags_per_account_per_day: 0, ..RdConfig::default() }).await;
    let proxy = counting_proxy(&url).await;
    let client = client(&rd, &proxy.url, 6000).await;
    let rules = rules();
    contacts::ensure_fields(&client, &contacts::needed_fields(&rules), true).await.unwrap();
    marketer_creates(&client, json!({"email": "customer1@example.com", "tags": ["black-friday"]})).await;
    let spent = TestTagPosts::new(false);
    let mut state = CustomerState::default();
    state.apply(&elo_events::sample::order_placed(1));
    let patches = || proxy.log().iter().filter(|c| c.method == "PATCH").count();
    // Unknown to Elo: upserted with its stage, and its tags wait (deferred, not as a spent
    // account budget) rather than a second PATCH.
    let first = sync_with_tag_posts(&client, &mut state, &rules, &spent).await;
    assert!(matches!(first, Err(Error::Deferred(_))), "{first:?}");
    assert_eq!(patches(), 1);
    assert!(state.contact_uuid.is_some());
    assert_eq!(contact(&rd, "customer1@example.com").unwrap()["funnel"]["lifecycle_stage"], "Qualified Lead");
    assert!(state.applied.tags.is_empty(), "the tags are not recorded as applied before they land");
    // The next sync: one read and one PATCH with fields and tags.
    assert_eq!(sync_with_tag_posts(&client, &mut state, &rules, &spent).await.unwrap(), 1, "tags by PATCH");
    assert_eq!(patches(), 2, "one PATCH per sync: {:?}", proxy.log());
    let c = contact(&rd, "customer1@example.com").unwrap();
    assert_eq!(tags(&c), ["black-friday", "buyer"]);
    assert_eq!(c["cf_elo_segment"], "buyer");
    assert!(state.applied.owned_tags.contains("buyer"), "the tag Elo added is Elo's");
    assert!(!state.applied.owned_tags.contains("black-friday"));

    // A second order: a new tag and a new field value in one PATCH; someone else's tag added
    // meanwhile survives.
    let uuid = state.contact_uuid.clone().unwrap();
    rd.sim.lock().unwrap().contacts.get_mut(&uuid).unwrap().fields["tags"] =
        json!(["black-friday", "buyer", "vip-manual"]);
    let mut second = elo_events::sample::order_placed(98);
    second.customer = elo_events::sample::order_placed(1).customer;
    second.customer_key = elo_events::sample::order_placed(1).customer_key;
    state.apply(&second);
    sync_with_tag_posts(&client, &mut state, &rules, &spent).await.unwrap();
    assert_eq!(patches(), 3, "one PATCH per sync: {:?}", proxy.log());
    let c = contact(&rd, "customer1@example.com").unwrap();
    assert_eq!(tags(&c), ["black-friday", "buyer", "repeat", "vip-manual"]);
    assert_eq!(c["cf_elo_order_count"], 2);
    let calls = proxy.log();
    assert!(calls.iter().all(|c| !c.path.ends_with("/tag")), "a tag post reached RD: {calls:?}");
    assert!(calls.iter().all(|c| c.status != 429), "{calls:?}");
}

/// A tag post counted against the share and then never sent (no budget slot: the account's
/// budget was spent meanwhile) is given back, or a backlog would burn the day's share in
/// minutes without one post reaching RD.
#[tokio::test]
async fn a_tag_post_that_never_left_is_given_back_to_the_share() {
    let (rd, proxy, client) = proxied(2, 10_000, 8).await;
    let rules = rules();
    // The custom fields, set up through a client of its own (its own budget).
    let setup = self::client(&rd, &proxy.url, 6000).await;
    contacts::ensure_fields(&setup, &contacts::needed_fields(&rules), true).await.unwrap();
    let mut state = CustomerState::default();
    state.apply(&elo_events::sample::order_placed(1));
    let posts = TestTagPosts::new(true);
    // A request spends one slot of 2, the upsert the other; the tag post finds none (a batch
    // under a backlog never waits).
    let batch = client.only_if_free();
    batch.request(Method::GET, "/platform/contacts/fields", None, Budget::Contacts).await.unwrap();
    let result = sync_with_tag_posts(&batch, &mut state, &rules, &posts).await;
    assert!(matches!(result, Err(Error::BudgetSpent)), "{result:?}");
    assert_eq!(posts.taken.load(SeqCst), 1, "{:?}", proxy.log());
    assert_eq!(posts.given_back.load(SeqCst), 1, "the unsent post was kept");
    assert!(proxy.log().iter().all(|c| !c.path.ends_with("/tag")));
    // Not sent: the contact holds no tag because of Elo, so none is Elo's to remove later.
    assert!(state.applied.owned_tags.is_empty(), "{:?}", state.applied.owned_tags);
}

/// RD refuses a tag post when the contact holds one of the tags already (someone added it
/// since Elo looked: a marketer, an automation). Nothing more is sent in that sync (no read,
/// no second post outside what the sweep reserved); the tag is not recorded as Elo's, and the
/// next sync reads the contact and PATCHes the rest. A later rule change that drops the tag
/// leaves it on the contact: it was never Elo's.
#[tokio::test]
async fn a_tag_the_contact_already_holds_is_not_taken_for_elos_and_the_next_sync_patches_the_rest() {
    let (rd, url) = serve_rdstation(RdConfig::default()).await;
    let proxy = counting_proxy(&url).await;
    let client = client(&rd, &proxy.url, 6000).await;
    contacts::ensure_fields(&client, &contacts::needed_fields(&rules()), true).await.unwrap();
    let mut state = CustomerState::default();
    state.apply(&elo_events::sample::order_placed(1));
    let posts = TestTagPosts::new(true);
    // Elo writes the contact with a rule's field and no tag first, so it knows the uuid; then
    // the rule also tags (a rules reload: the fields do not change, so no upsert shows the tags).
    let untagged = Rules::parse("[[rule]]\nname = \"buyer\"\nfields = { cf_elo_segment = \"buyer\" }\n", "v1").unwrap();
    let rules = Rules::parse(
        "[[rule]]\nname = \"buyer\"\ntags = [\"buyer\", \"elo\"]\nfields = { cf_elo_segment = \"buyer\" }\n",
        "v2",
    )
    .unwrap();
    sync_with_tag_posts(&client, &mut state, &untagged, &posts).await.unwrap();
    let uuid = state.contact_uuid.clone().unwrap();
    // An automation tags it "buyer" behind Elo's back.
    rd.sim.lock().unwrap().contacts.get_mut(&uuid).unwrap().fields.insert("tags".into(), json!(["buyer"]));
    let before = proxy.log().len();
    // What the sync saves to the state store, last first.
    let saved: std::sync::Mutex<Vec<CustomerState>> = Default::default();
    let persist = |s: CustomerState| -> BoxFuture<'_, rdstation_sink::client::Result<()>> {
        saved.lock().unwrap().push(s);
        Box::pin(async { Ok(()) })
    };
    let aggregate = state.aggregate(rdstation_sink_now());
    let desired = contacts::desired(&state, &aggregate, &rules.evaluate(&aggregate));
    let result = contacts::sync(&client, &mut state, &desired, &persist, &posts).await;
    assert!(matches!(result, Err(Error::Deferred(_))), "{result:?}");
    let stored = saved.lock().unwrap().last().cloned().unwrap();
    assert!(
        !stored.applied.owned_tags.contains("buyer") && stored.tags_unknown,
        "the stored state claims the automation's tag (a later failure would keep it): {:?}",
        stored.applied.owned_tags
    );
    let calls: Vec<String> = proxy.log()[before..].iter().map(|c| format!("{} {}", c.method, c.path)).collect();
    assert_eq!(calls.iter().filter(|c| c.ends_with("/tag")).count(), 1, "one tag post: {calls:?}");
    assert!(!calls.iter().any(|c| c.starts_with("GET")), "no read outside the sweep's reservation: {calls:?}");
    assert!(!state.applied.owned_tags.contains("buyer"), "someone else's tag taken for Elo's");
    // The next sync reads and PATCHes: no tag post again.
    sync_with_tag_posts(&client, &mut state, &rules, &posts).await.unwrap();
    assert_eq!(posts.taken.load(SeqCst), 1, "a second tag post was sent");
    assert!(!state.tags_unknown);
    let c = contact(&rd, "customer1@example.com").unwrap();
    assert_eq!(tags(&c), ["buyer", "elo"]);
    assert!(state.applied.owned_tags.contains("elo") && !state.applied.owned_tags.contains("buyer"));
    // Rules without the tags: Elo's goes, the automation's stays.
    sync_with_tag_posts(&client, &mut state, &untagged, &posts).await.unwrap();
    assert_eq!(tags(&contact(&rd, "customer1@example.com").unwrap()), ["buyer"]);
}

/// A contact created outside Elo (a marketer, a form, another tool) through RD's API.
async fn marketer_creates(client: &RdClient, contact: Value) {
    client.request(Method::POST, "/platform/contacts", Some(&contact), Budget::Contacts).await.unwrap();
}

fn rdstation_sink_now() -> i64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as i64
}

#[tokio::test]
async fn contacts_keep_outside_tags_follow_email_changes_and_coalesce() {
    let (rd, url) = serve_rdstation(RdConfig::default()).await;
    let client = client(&rd, &url, 6000).await;
    let rules = rules();
    let missing = contacts::ensure_fields(&client, &contacts::needed_fields(&rules), true).await.unwrap();
    assert!(missing.is_empty());
    let fields: Vec<String> = rd.sim.lock().unwrap().fields.iter().map(|f| f.api_identifier.clone()).collect();
    assert!(fields.contains(&"cf_elo_order_count".into()) && fields.contains(&"cf_elo_segment".into()), "{fields:?}");
    let created = contacts::ensure_fields(&client, &contacts::needed_fields(&rules), true).await.unwrap();
    assert!(created.is_empty(), "a second check creates nothing");

    // A marketer created the contact and tagged it before Elo saw the customer.
    marketer_creates(&client, json!({"email": "customer1@example.com", "tags": ["black-friday"]})).await;
    let mut state = CustomerState::default();
    state.apply(&elo_events::sample::order_placed(1));
    assert_eq!(sync(&client, &mut state, &rules).await, 3, "upsert, tag, funnel");
    let c = contact(&rd, "customer1@example.com").unwrap();
    assert_eq!(tags(&c), ["black-friday", "buyer"]);
    assert_eq!(c["funnel"]["lifecycle_stage"], "Qualified Lead");
    assert_eq!(c["cf_elo_segment"], "buyer");
    assert_eq!(c["legal_bases"][0]["status"], "granted");
    assert_eq!(c["state"], "SP");
    let uuid = state.contact_uuid.clone().unwrap();
    assert_eq!(c["uuid"], uuid.as_str());

    // Nothing changed: no request at all.
    let before = rd.counters.snapshot();
    assert_eq!(sync(&client, &mut state, &rules).await, 0);
    assert_eq!(before, rd.counters.snapshot(), "a coalesced update makes no request");

    // A second order: new tag appended, outside tag kept; someone adds another tag meanwhile.
    rd.sim.lock().unwrap().contacts.get_mut(&uuid).unwrap().fields["tags"] =
        json!(["black-friday", "buyer", "vip-manual"]);
    let mut second = elo_events::sample::order_placed(98);
    second.customer = elo_events::sample::order_placed(1).customer;
    second.customer_key = elo_events::sample::order_placed(1).customer_key;
    state.apply(&second);
    sync(&client, &mut state, &rules).await;
    let c = contact(&rd, "customer1@example.com").unwrap();
    assert_eq!(tags(&c), ["black-friday", "buyer", "repeat", "vip-manual"]);
    assert_eq!(c["cf_elo_order_count"], 2);

    // The e-mail changes in Magento: the same contact follows, no second one appears.
    let mut changed = second.clone();
    changed.source_version.updated_at += 1000;
    changed.customer.as_mut().unwrap().email = "ana.new@example.com".into();
    state.apply(&changed);
    sync(&client, &mut state, &rules).await;
    assert!(contact(&rd, "customer1@example.com").is_none(), "the old address is gone");
    let c = contact(&rd, "ana.new@example.com").unwrap();
    assert_eq!(c["uuid"], uuid.as_str());
    assert_eq!(tags(&c), ["black-friday", "buyer", "repeat", "vip-manual"]);
    assert_eq!(rd.sim.lock().unwrap().contacts.len(), 1);

    // Deleted in RD meanwhile: the next write recreates it by e-mail.
    rd.sim.lock().unwrap().contacts.clear();
    state.applied.fields.clear();
    sync(&client, &mut state, &rules).await;
    let c = contact(&rd, "ana.new@example.com").unwrap();
    assert_ne!(c["uuid"], uuid.as_str());
    assert_eq!(state.contact_uuid.as_deref(), c["uuid"].as_str());
    assert_eq!(tags(&c), ["buyer", "repeat"], "Elo's tags come back on the recreated contact");
}

/// Locally (`make run`) no refresh token is configured: the client takes an authorization code
/// from the sandbox's control API, as RD's consent dialog would give one, and the code grant
/// yields its tokens.
#[tokio::test]
async fn without_a_refresh_token_the_local_sandbox_authorizes_through_its_control_api() {
    let (rd, url) = serve_rdstation(RdConfig::default()).await;
    let faults = sandbox::faults::Faults::default();
    let counters = sandbox::Counters::default();
    let control = sandbox::control::Control {
        faults: faults.clone(),
        counters: counters.clone(),
        salesforce: sandbox::salesforce::SalesforceApp::new(Default::default(), faults.clone(), counters.clone()),
        rdstation: rd.clone(),
        magento: sandbox::magento::MagentoApp::new(Default::default(), Default::default(), faults, counters),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let control_url = format!("http://{}", listener.local_addr().unwrap());
    tokio::spawn(async move { axum::serve(listener, sandbox::control::router(control)).await });
    let client = RdClient::new(RdSettings {
        base_url: url,
        client_id: "elo-rd-client".into(),
        client_secret: "elo-rd-secret".into(),
        refresh_token: None,
        sandbox_control: Some(control_url),
        contacts_per_minute: NonZeroU32::new(600).unwrap(),
        request_timeout: Duration::from_secs(5),
    })
    .unwrap();
    client.request(Method::GET, "/platform/contacts/fields", None, Budget::Contacts).await.unwrap();
    // Later expiries use the refresh token the code grant returned, not a new code.
    rd.sim.lock().unwrap().expire_tokens();
    client.request(Method::GET, "/platform/contacts/fields", None, Budget::Contacts).await.unwrap();
    assert_eq!(rd.counters.snapshot()["rdstation"]["POST /auth/token"], 2);
}

/// Tokens expiring every few milliseconds while several requests run at once (the sink works
/// customers concurrently): a request whose token was already replaced by another task's
/// refresh, and expired again before it was used, must refresh again rather than fail the
/// record as an `auth` error (which the runtime holds the partition for, with growing waits).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_requests_survive_tokens_expiring_every_few_milliseconds() {
    let (rd, url) = serve_rdstation(RdConfig { contacts_per_minute: 1_000_000, ..RdConfig::default() }).await;
    let client = client(&rd, &url, 1_000_000).await;
    let expiring = {
        let rd = rd.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(25)).await;
                rd.sim.lock().unwrap().expire_tokens();
            }
        })
    };
    let tasks: Vec<_> = (0..12)
        .map(|_| {
            let client = client.clone();
            tokio::spawn(async move {
                let mut failures = Vec::new();
                for _ in 0..40 {
                    if let Err(e) =
                        client.request(Method::GET, "/platform/contacts/fields", None, Budget::Contacts).await
                    {
                        failures.push(e.to_string());
                    }
                }
                failures
            })
        })
        .collect();
    let mut failures = Vec::new();
    for task in tasks {
        failures.extend(task.await.unwrap());
    }
    expiring.abort();
    let refreshes = rd.counters.snapshot()["rdstation"]["POST /auth/token"].as_u64().unwrap();
    assert!(refreshes > 10, "the tokens did expire under the requests ({refreshes} token grants)");
    assert!(failures.is_empty(), "{} of 480 requests failed: {:?}", failures.len(), &failures[..failures.len().min(3)]);
}

#[tokio::test]
async fn erasing_a_customer_whose_contact_was_never_written_deletes_it_by_email() {
    let (rd, url) = serve_rdstation(RdConfig::default()).await;
    let client = client(&rd, &url, 6000).await;
    // The contact write was deferred (no uuid kept), but RD knows the person's e-mail: their
    // events carried it, or a marketer created the contact.
    marketer_creates(&client, json!({"email": "gone+1@example.com"})).await;
    marketer_creates(&client, json!({"email": "kept@example.com"})).await;
    let mut state = CustomerState::default();
    state.identity.email = "gone+1@example.com".into();
    assert!(state.contact_uuid.is_none());
    contacts::erase(&client, &state).await.unwrap();
    assert!(contact(&rd, "gone+1@example.com").is_none(), "the erased person's contact is gone");
    assert!(contact(&rd, "kept@example.com").is_some(), "nobody else's");
    // Erasing again (a replay) finds nothing: already gone is done.
    contacts::erase(&client, &state).await.unwrap();
    // Nothing known about the person: nothing to delete, nothing asked.
    let before = rd.counters.snapshot();
    contacts::erase(&client, &CustomerState::default()).await.unwrap();
    assert_eq!(rd.counters.snapshot(), before);
}

/// The customer changed e-mail and their new orders' events reached RD (which creates a contact
/// for an unknown e-mail) before the contact write moved the known contact to it: RD holds two
/// contacts of the person. An erasure deletes both: the known one by uuid, the other by the
/// e-mail Elo holds now. Someone else's contact is kept.
#[tokio::test]
async fn erasing_a_customer_whose_email_changed_before_the_contact_followed_deletes_both_contacts() {
    let (rd, url) = serve_rdstation(RdConfig::default()).await;
    let client = client(&rd, &url, 6000).await;
    let rules = rules();
    contacts::ensure_fields(&client, &contacts::needed_fields(&rules), true).await.unwrap();
    let mut state = CustomerState::default();
    state.apply(&elo_events::sample::order_placed(1));
    sync(&client, &mut state, &rules).await;
    assert!(state.contact_uuid.is_some() && contact(&rd, "customer1@example.com").is_some());
    // The new e-mail reaches RD through the events, as a contact of its own; Elo's contact
    // write that would move the known contact to it has not happened (deferred, or not yet due).
    state.identity.email = "ana.new@example.com".into();
    for email in ["ana.new@example.com", "kept@example.com"] {
        marketer_creates(&client, json!({ "email": email })).await;
    }
    contacts::erase(&client, &state).await.unwrap();
    assert!(contact(&rd, "customer1@example.com").is_none(), "the contact Elo wrote is gone");
    assert!(contact(&rd, "ana.new@example.com").is_none(), "the contact under the new e-mail is gone too");
    assert!(contact(&rd, "kept@example.com").is_some(), "nobody else's");
    // With nothing changed, an erasure asks for the known contact only.
    let mut other = CustomerState::default();
    other.apply(&elo_events::sample::order_placed(2));
    sync(&client, &mut other, &rules).await;
    let before = rd.counters.snapshot()["rdstation"]["DELETE /platform/contacts/{id}"].as_u64().unwrap_or(0);
    contacts::erase(&client, &other).await.unwrap();
    let after = rd.counters.snapshot()["rdstation"]["DELETE /platform/contacts/{id}"].as_u64().unwrap_or(0);
    assert_eq!(after - before, 1, "one DELETE when the e-mail never changed");
}

/// Each hop of a redirect would be a request RD counts and the budget did not: the client
/// does not follow them. A 3xx (a wrong base URL) waits for an operator (class `auth`: the
/// records are held, never dead-lettered) and nothing reaches the redirect's target.
#[tokio::test]
async fn a_redirect_is_not_followed_outside_the_budget_and_holds_records_for_an_operator() {
    let (rd, url) = serve_rdstation(RdConfig::default()).await;
    let proxy = counting_proxy(&url).await;
    let refresh = rd_refresh_token(&rd, &proxy.url).await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let moved = format!("http://{}", listener.local_addr().unwrap());
    let target = proxy.url.clone();
    // The token endpoint is passed through (the client gets its token), the API redirected.
    let token_url = format!("{}/auth/token", proxy.url);
    let router = axum::Router::new()
        .route(
            "/auth/token",
            axum::routing::post(move |body: String| {
                let token_url = token_url.clone();
                async move {
                    let answer = reqwest::Client::new()
                        .post(&token_url)
                        .header("content-type", "application/json")
                        .body(body)
                        .send()
                        .await
                        .unwrap();
                    (axum::http::StatusCode::from_u16(answer.status().as_u16()).unwrap(), answer.text().await.unwrap())
                }
            }),
        )
        .fallback(move |uri: axum::http::Uri| {
            let to = format!("{target}{}", uri.path());
            async move { axum::response::Redirect::temporary(&to) }
        });
    tokio::spawn(async move { axum::serve(listener, router).await });
    let client = RdClient::new(RdSettings {
        base_url: moved,
        client_id: "elo-rd-client".into(),
        client_secret: "elo-rd-secret".into(),
        refresh_token: Some(refresh),
        sandbox_control: None,
        contacts_per_minute: NonZeroU32::new(6000).unwrap(),
        request_timeout: Duration::from_secs(5),
    })
    .unwrap();
    let before = proxy.calls();
    let error = client.request(Method::GET, "/platform/contacts/fields", None, Budget::Contacts).await.unwrap_err();
    assert!(matches!(&error, Error::Auth { code } if code == "redirected_307"), "{error:?}");
    assert_eq!(error.class(), ErrorClass::Auth, "{error}");
    assert_eq!(proxy.calls(), before, "the redirect was followed: {:?}", proxy.log());
}
