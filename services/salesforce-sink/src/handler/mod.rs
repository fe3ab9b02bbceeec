//! Applies a batch of commerce events to Salesforce and says, per record, what happened.
//!
//! Steps: decode failures and unmappable events (no e-mail, unknown store) are refused with
//! a reason; versions older than what the sink confirmed for the same order or customer are
//! skipped (never stale), and of several versions of one order in a batch only the newest is
//! written; missing products and price book entries are upserted (one Composite call of
//! sObject Collections, cached afterwards); then the Composite Graph requests go out and
//! each graph's result is read back node by node.
//!
//! Errors by class: a row-level data error fails its record `Permanent` (DLQ, with the
//! Salesforce code and fields) and the other records of its graph, rolled back with it,
//! `Transient` so the runtime retries them without it; lock errors and 5xx are `Transient`;
//! 403 `REQUEST_LIMIT_EXCEEDED` is `RateLimited` (the runtime waits, never drops); a session
//! refused after one re-authentication is `Auth`.
//!
//! State: the confirmed version per order and per customer lives in memory and is rebuilt by
//! replay (at-least-once re-delivers from the last commit, in order, and upserts are
//! idempotent), so a restart costs calls, never correctness.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration;

use elo_events::{CommerceEvent, CommerceEventType, OutcomeStatus};
use elo_kafka::{ErrorClass, HandlerError};
use reqwest::Method;
use serde_json::Value;

use crate::client::{self, SalesforceClient};
use crate::graph::{self, Builder, GraphPlan, OrgIds, Owner, Work, customer_version};
use crate::mapping::{AccountMode, Resolved};
use crate::metrics;

mod erasure;
mod products;
mod resend;

/// What happened to one record.
#[derive(Clone, Debug)]
pub struct Verdict {
    pub result: Result<(), HandlerError>,
    /// The outcome to publish (`None`: nothing to report yet, e.g. a retriable failure).
    pub outcome: Option<OutcomeStatus>,
    pub target_ids: BTreeMap<String, String>,
    /// The failure came from its graph (a lock, a rollback), not from the whole call.
    retry_in_call: bool,
}

/// Extra rounds within one handler call for graphs that failed transiently.
const IN_CALL_RETRIES: usize = 4;

impl Verdict {
    fn ok(status: OutcomeStatus) -> Self {
        Self { result: Ok(()), outcome: Some(status), target_ids: BTreeMap::new(), retry_in_call: false }
    }
    fn failed(error: HandlerError) -> Self {
        let outcome = (error.class == ErrorClass::Permanent).then_some(OutcomeStatus::DeadLettered);
        Self { result: Err(error), outcome, target_ids: BTreeMap::new(), retry_in_call: false }
    }
    fn graph_failed(error: HandlerError) -> Self {
        let retry_in_call = error.class == ErrorClass::Transient;
        Self { retry_in_call, ..Self::failed(error) }
    }
}

/// The Salesforce side of the sink.
pub struct Sink {
    pub client: SalesforceClient,
    pub mapping: Resolved,
    pub org: OrgIds,
    /// How long to wait after 403 REQUEST_LIMIT_EXCEEDED (Salesforce sends no Retry-After).
    pub quota_pause: Duration,
    /// Price book entries known to exist (`pbe:s<store>:<sku>`).
    entries: Mutex<HashSet<String>>,
    /// Confirmed source version (`updated_at`) and Salesforce ids per `order:<id>` and
    /// `customer:<key>`. Bounded: past [`CONFIRMED_CAP`] entries it is cleared, which only
    /// costs calls (per-key order means a replay ends on the newest version anyway).
    confirmed: Mutex<HashMap<String, Confirmed>>,
    /// Keys a `RESEND` asked to write again at their confirmed version (one-shot, see resend.rs).
    rewrite: Mutex<HashSet<String>>,
}

/// Entries kept in the confirmed-version map before it is cleared.
pub const CONFIRMED_CAP: usize = 500_000;

/// What the sink knows Salesforce holds for one entity.
#[derive(Clone, Debug)]
struct Confirmed {
    version: i64,
    target_ids: BTreeMap<String, String>,
}

fn order_entity(e: &CommerceEvent) -> Option<String> {
    e.order.as_ref().map(|o| format!("order:{}", o.entity_id))
}

fn customer_entity(e: &CommerceEvent) -> String {
    format!("customer:{}", e.customer_key)
}

/// Keeps personal data out of messages that reach the DLQ and logs.
fn scrub(message: &str) -> String {
    message.split(' ').map(|w| if w.contains('@') { "<redacted>" } else { w }).collect::<Vec<_>>().join(" ")
}

/// The class of a Salesforce error code / status.
pub fn classify(status: u16, code: &str, message: &str, fields: &[String], quota_pause: Duration) -> HandlerError {
    let text =
        if fields.is_empty() { scrub(message) } else { format!("{} [fields: {}]", scrub(message), fields.join(", ")) };
    match code {
        "REQUEST_LIMIT_EXCEEDED" => {
            HandlerError::new(ErrorClass::RateLimited, code, text).with_retry_after(quota_pause)
        }
        "INVALID_SESSION_ID" | "invalid_grant" | "invalid_client" => HandlerError::new(ErrorClass::Auth, code, text),
        "UNABLE_TO_LOCK_ROW" | "SERVER_UNAVAILABLE" | "timeout" | "transport" => HandlerError::transient(code, text),
        _ if status >= 500 || status == 0 || status == 408 || status == 429 => HandlerError::transient(code, text),
        _ => HandlerError::permanent(code, text),
    }
}

fn from_client(e: &client::Error, quota_pause: Duration) -> HandlerError {
    match e {
        client::Error::Transport(_) => classify(0, &e.code(), &e.to_string(), &[], quota_pause),
        client::Error::Status { status, code, message } => classify(*status, code, message, &[], quota_pause),
        client::Error::Auth { code, message } => HandlerError::new(ErrorClass::Auth, code.clone(), scrub(message)),
        client::Error::Decode(m) => HandlerError::transient("decode_response", m.clone()),
    }
}

/// The first real error of a composite item body (`[{"errorCode","message","fields"}]`).
fn item_error(item: &Value) -> Option<(u16, String, String, Vec<String>)> {
    let status = item["httpStatusCode"].as_u64().unwrap_or(0) as u16;
    if (200..300).contains(&status) {
        return None;
    }
    let first = item["body"].as_array().and_then(|a| a.first()).cloned().unwrap_or(Value::Null);
    let code = first["errorCode"].as_str().unwrap_or("unknown").to_owned();
    let message = first["message"].as_str().unwrap_or_default().to_owned();
    let fields = first["fields"].as_array().map(|f| f.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect());
    Some((status, code, message, fields.unwrap_or_default()))
}

impl Sink {
    pub fn new(client: SalesforceClient, mapping: Resolved, org: OrgIds, quota_pause: Duration) -> Self {
        Self {
            client,
            mapping,
            org,
            quota_pause,
            entries: Mutex::new(HashSet::new()),
            confirmed: Mutex::new(HashMap::new()),
            rewrite: Mutex::new(HashSet::new()),
        }
    }

    /// Applies decoded events (a decode failure stays that record's verdict).
    pub async fn apply(&self, events: &[Result<CommerceEvent, HandlerError>]) -> Vec<Verdict> {
        let mut verdicts: Vec<Option<Verdict>> = vec![None; events.len()];
        let mut pending: Vec<(usize, &CommerceEvent)> = Vec::new();
        for (i, event) in events.iter().enumerate() {
            match event {
                Err(e) => verdicts[i] = Some(Verdict::failed(e.clone())),
                Ok(e) => match self.unmappable(e) {
                    Some(reason) => verdicts[i] = Some(Verdict::failed(HandlerError::permanent("unmappable", reason))),
                    None => pending.push((i, e)),
                },
            }
        }
        // Never stale: drop versions older than the confirmed one, and all but the newest
        // version of an entity within the batch.
        let mut newest: HashMap<String, (i64, usize)> = HashMap::new();
        for (i, e) in &pending {
            let key = order_entity(e).unwrap_or_else(|| customer_entity(e));
            let v = e.source_version.updated_at;
            let entry = newest.entry(key).or_insert((v, *i));
            if v >= entry.0 {
                *entry = (v, *i);
            }
        }
        let mut work = Vec::new();
        let mut erasures = Vec::new();
        {
            let confirmed = self.confirmed.lock().expect("confirmed lock");
            let rewrite = self.rewrite.lock().expect("rewrite lock");
            for (i, e) in &pending {
                if e.event_type == CommerceEventType::CustomerErased {
                    // Always applied (idempotent), after the batch's other writes.
                    erasures.push((*i, *e));
                    continue;
                }
                let key = order_entity(e).unwrap_or_else(|| customer_entity(e));
                let v = e.source_version.updated_at;
                match confirmed.get(&key) {
                    Some(c) if v < c.version => {
                        verdicts[*i] = Some(Verdict::ok(OutcomeStatus::SkippedStale));
                        continue;
                    }
                    Some(c) if v == c.version && !rewrite.contains(&key) => {
                        // Already applied (a redelivery): reported again, no call.
                        let mut verdict = Verdict::ok(OutcomeStatus::Applied);
                        verdict.target_ids = c.target_ids.clone();
                        verdicts[*i] = Some(verdict);
                        continue;
                    }
                    _ => {}
                }
                if newest.get(&key).is_some_and(|(_, j)| j != i) {
                    verdicts[*i] = Some(Verdict::ok(OutcomeStatus::SkippedStale));
                    continue;
                }
                let write_customer =
                    confirmed.get(&customer_entity(e)).is_none_or(|c| customer_version(e) >= c.version);
                work.push(Work { index: *i, event: e, write_customer });
            }
        }
        let failed = self.ensure_entries(&work).await;
        work.retain(|w| match failed.get(&w.index) {
            Some(error) => {
                verdicts[w.index] = Some(Verdict::failed(error.clone()));
                false
            }
            None => true,
        });
        let builder = Builder { mapping: &self.mapping, org: &self.org, version: self.client.api_version() };
        for request in builder.build(&work, false) {
            let results = self.send(&request).await;
            for (index, verdict) in results {
                verdicts[index] = Some(verdict);
            }
        }
        // Graphs that failed transiently (a lock, a record rolled back with another one) are
        // sent again at once, one record per graph, before the batch is handed back: the
        // runtime would otherwise retry the whole suffix and spend every record's budget.
        for _ in 0..IN_CALL_RETRIES {
            let again: Vec<&Work<'_>> =
                work.iter().filter(|w| verdicts[w.index].as_ref().is_some_and(|v| v.retry_in_call)).collect();
            if again.is_empty() {
                break;
            }
            let again: Vec<Work<'_>> = again
                .into_iter()
                .map(|w| Work { index: w.index, event: w.event, write_customer: w.write_customer })
                .collect();
            for request in builder.build(&again, true) {
                for (index, verdict) in self.send(&request).await {
                    verdicts[index] = Some(verdict);
                }
            }
        }
        // Confirm what was applied.
        {
            let mut confirmed = self.confirmed.lock().expect("confirmed lock");
            if confirmed.len() > CONFIRMED_CAP {
                confirmed.clear();
            }
            for w in &work {
                let Some(verdict) = verdicts[w.index].as_ref().filter(|v| v.result.is_ok()) else { continue };
                self.rewritten(&order_entity(w.event).unwrap_or_else(|| customer_entity(w.event)));
                let v = w.event.source_version.updated_at;
                if let Some(key) = order_entity(w.event) {
                    confirmed.insert(key, Confirmed { version: v, target_ids: verdict.target_ids.clone() });
                } else if w.event.customer.is_some() {
                    let c = confirmed
                        .entry(customer_entity(w.event))
                        .or_insert(Confirmed { version: v, target_ids: verdict.target_ids.clone() });
                    c.version = c.version.max(v);
                }
                if w.write_customer && w.event.order.is_some() {
                    let cv = customer_version(w.event);
                    let mut ids = verdict.target_ids.clone();
                    ids.remove("Order");
                    let c = confirmed
                        .entry(customer_entity(w.event))
                        .or_insert(Confirmed { version: cv, target_ids: BTreeMap::new() });
                    c.version = c.version.max(cv);
                    if !ids.is_empty() {
                        c.target_ids = ids;
                    }
                }
            }
        }
        for (i, e) in erasures {
            let verdict = match self.erase(e).await {
                Ok(ids) => {
                    let mut confirmed = self.confirmed.lock().expect("confirmed lock");
                    let c = confirmed
                        .entry(customer_entity(e))
                        .or_insert(Confirmed { version: e.source_version.updated_at, target_ids: BTreeMap::new() });
                    // Nothing older than the erasure may write this person's data again.
                    c.version = c.version.max(e.source_version.updated_at);
                    Verdict { target_ids: ids, ..Verdict::ok(OutcomeStatus::Applied) }
                }
                Err(error) => Verdict::failed(error),
            };
            verdicts[i] = Some(verdict);
        }
        verdicts
            .into_iter()
            .map(|v| v.unwrap_or_else(|| Verdict::failed(HandlerError::transient("not_attempted", "not attempted"))))
            .collect()
    }

    /// Why an event cannot be mapped, if it cannot.
    fn unmappable(&self, e: &CommerceEvent) -> Option<String> {
        match e.event_type {
            CommerceEventType::OrderPlaced | CommerceEventType::OrderChanged => {
                let Some(order) = &e.order else { return Some("order event without an order".into()) };
                if e.customer.as_ref().is_none_or(|c| c.email.trim().is_empty()) {
                    return Some("order without a customer e-mail".into());
                }
                if !self.org.pricebooks.contains_key(&e.store.store_id) {
                    return Some(format!("unknown store {} (no price book mapped)", e.store.store_id));
                }
                if order.items.is_empty() {
                    return Some("order without items".into());
                }
                None
            }
            CommerceEventType::CustomerChanged => match &e.customer {
                Some(c) if !c.email.trim().is_empty() => {
                    if self.mapping.mode == AccountMode::Person && c.lastname.as_deref().is_none_or(str::is_empty) {
                        return Some("person account without a last name".into());
                    }
                    None
                }
                _ => Some("customer event without an e-mail".into()),
            },
            CommerceEventType::CustomerErased => None,
            CommerceEventType::Unknown => Some("unknown event type".into()),
        }
    }

    /// Sends one Composite Graph request and reads each graph's result.
    async fn send(&self, graphs: &[GraphPlan]) -> Vec<(usize, Verdict)> {
        let records: usize = graphs.iter().map(|g| g.records.len()).sum();
        let mut out = Vec::with_capacity(records);
        if graphs.iter().all(|g| g.body["compositeRequest"].as_array().is_none_or(Vec::is_empty)) {
            for g in graphs {
                out.extend(g.records.iter().map(|i| (*i, Verdict::ok(OutcomeStatus::Applied))));
            }
            return out;
        }
        let body = graph::request_body(graphs);
        let response = match self.client.call("graph", Method::POST, "/composite/graph", Some(&body)).await {
            Ok(r) => r,
            Err(e) => {
                let error = from_client(&e, self.quota_pause);
                tracing::warn!(error = %e, error_code = %error.code, records, "composite graph call failed");
                for g in graphs {
                    out.extend(g.records.iter().map(|i| (*i, Verdict::failed(error.clone()))));
                }
                return out;
            }
        };
        metrics::RECORDS_PER_CALL.observe(records as f64);
        let results = response["graphs"].as_array().cloned().unwrap_or_default();
        for g in graphs {
            let result = results.iter().find(|r| r["graphId"] == g.graph_id.as_str());
            let items =
                result.and_then(|r| r["graphResponse"]["compositeResponse"].as_array()).cloned().unwrap_or_default();
            if result.is_some_and(|r| r["isSuccessful"] == true) {
                let id_of = |reference: &str| {
                    items.iter().find(|i| i["referenceId"] == reference).and_then(|i| i["body"]["id"].as_str())
                };
                for i in &g.records {
                    let mut v = Verdict::ok(OutcomeStatus::Applied);
                    if let Some(id) = id_of("a") {
                        v.target_ids.insert("Account".into(), id.into());
                    }
                    if let Some(id) = id_of("c") {
                        v.target_ids.insert("Contact".into(), id.into());
                    }
                    if let Some(id) = id_of(&format!("o{i}")) {
                        v.target_ids.insert("Order".into(), id.into());
                    }
                    out.push((*i, v));
                }
                continue;
            }
            // The culprit: the first failure that is not a knock-on PROCESSING_HALTED.
            let culprit = items.iter().find_map(|item| {
                let e = item_error(item)?;
                (e.1 != "PROCESSING_HALTED").then(|| (item["referenceId"].as_str().unwrap_or_default().to_owned(), e))
            });
            let Some((reference, (status, code, message, fields))) = culprit else {
                let error = HandlerError::transient("graph_failed", "graph failed without a reported cause");
                out.extend(g.records.iter().map(|i| (*i, Verdict::graph_failed(error.clone()))));
                continue;
            };
            let object = reference_object(&reference);
            let error = classify(status, &code, &format!("{object}: {message}"), &fields, self.quota_pause);
            tracing::info!(error_code = %code, object, class = error.class.as_str(), "graph refused");
            match g.owners.get(&reference) {
                Some(Owner::Record(culprit)) if error.class == ErrorClass::Permanent => {
                    for i in &g.records {
                        let verdict = if i == culprit {
                            Verdict::failed(error.clone())
                        } else {
                            Verdict::graph_failed(HandlerError::transient(
                                "graph_rolled_back",
                                format!("rolled back with a failing record of its graph ({code})"),
                            ))
                        };
                        out.push((*i, verdict));
                    }
                }
                _ => out.extend(g.records.iter().map(|i| (*i, Verdict::graph_failed(error.clone())))),
            }
        }
        out
    }
}

/// The object a graph node writes, from its reference id.
fn reference_object(reference: &str) -> &'static str {
    match reference.chars().next() {
        Some('a') => "Account",
        Some('c') => "Contact",
        Some('o') | Some('x') => "Order",
        Some('i') => "OrderItem",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes_follow_salesforce_codes() {
        let p = Duration::from_secs(30);
        assert_eq!(classify(400, "UNABLE_TO_LOCK_ROW", "", &[], p).class, ErrorClass::Transient);
        assert_eq!(classify(503, "SERVER_UNAVAILABLE", "", &[], p).class, ErrorClass::Transient);
        let quota = classify(403, "REQUEST_LIMIT_EXCEEDED", "TotalRequests Limit exceeded.", &[], p);
        assert_eq!((quota.class, quota.retry_after), (ErrorClass::RateLimited, Some(p)));
        assert_eq!(classify(401, "INVALID_SESSION_ID", "", &[], p).class, ErrorClass::Auth);
        let data =
            classify(400, "REQUIRED_FIELD_MISSING", "Required fields are missing: [LastName]", &["LastName".into()], p);
        assert_eq!(data.class, ErrorClass::Permanent);
        assert!(data.message.contains("[fields: LastName]"), "{}", data.message);
    }

    #[test]
    fn messages_lose_email_addresses() {
        assert_eq!(scrub("duplicate ana@example.com found"), "duplicate <redacted> found");
    }
}
