//! One Composite Graph request: sent, and each graph's result read back node by node (the
//! culprit of a failed graph found and blamed, the records rolled back with it retried).

use elo_events::OutcomeStatus;
use elo_kafka::{ErrorClass, HandlerError};
use reqwest::Method;

use super::{Sink, Verdict, classify, from_client, item_error};
use crate::graph::{self, GraphPlan, Owner};
use crate::metrics;

impl Sink {
    /// Sends one Composite Graph request and reads each graph's result.
    pub(super) async fn send(&self, graphs: &[GraphPlan]) -> Vec<(usize, Verdict)> {
        self.send_graphs(graphs).await.into_iter().flatten().collect()
    }

    /// Sends one Composite Graph request; the verdicts of each graph's records, in the order
    /// of `graphs` (the pool hands each batch its own).
    pub(super) async fn send_graphs(&self, graphs: &[GraphPlan]) -> Vec<Vec<(usize, Verdict)>> {
        let records: usize = graphs.iter().map(|g| g.records.len()).sum();
        let mut all = Vec::with_capacity(graphs.len());
        if graphs.iter().all(|g| g.nodes() == 0) {
            for g in graphs {
                all.push(g.records.iter().map(|i| (*i, Verdict::ok(OutcomeStatus::Applied))).collect());
            }
            return all;
        }
        let body = graph::request_body(graphs);
        let response = match self.client.call("graph", Method::POST, "/composite/graph", Some(&body)).await {
            Ok(r) => r,
            Err(e) => {
                let error = from_client(&e, self.quota_pause);
                tracing::warn!(error = %e, error_code = %error.code, records, "composite graph call failed");
                for g in graphs {
                    all.push(g.records.iter().map(|i| (*i, Verdict::failed(error.clone()))).collect());
                }
                return all;
            }
        };
        metrics::RECORDS_PER_CALL.observe(records as f64);
        let results = response["graphs"].as_array().map_or(&[][..], Vec::as_slice);
        for g in graphs {
            all.push(self.graph_verdicts(g, results));
        }
        all
    }

    /// One graph's verdicts from the response's `graphs`.
    fn graph_verdicts(&self, g: &GraphPlan, results: &[serde_json::Value]) -> Vec<(usize, Verdict)> {
        let mut out = Vec::with_capacity(g.records.len());
        {
            let result = results.iter().find(|r| r["graphId"] == g.graph_id.as_str());
            let items =
                result.and_then(|r| r["graphResponse"]["compositeResponse"].as_array()).map_or(&[][..], Vec::as_slice);
            if result.is_some_and(|r| r["isSuccessful"] == true) {
                let id_of = |reference: &str| {
                    items.iter().find(|i| i["referenceId"] == reference).and_then(|i| i["body"]["id"].as_str())
                };
                for i in &g.records {
                    let mut v = Verdict::ok(OutcomeStatus::Applied);
                    let tag = g.customers.get(i).map_or("", String::as_str);
                    if let Some(id) = id_of(&format!("a{tag}")) {
                        v.target_ids.insert("Account".into(), id.into());
                    }
                    if let Some(id) = id_of(&format!("c{tag}")) {
                        v.target_ids.insert("Contact".into(), id.into());
                    }
                    if let Some(id) = id_of(&format!("o{i}")) {
                        v.target_ids.insert("Order".into(), id.into());
                    }
                    out.push((*i, v));
                }
                return out;
            }
            // The culprit: the first failure that is not a knock-on PROCESSING_HALTED.
            let culprit = items.iter().find_map(|item| {
                let e = item_error(item)?;
                (e.1 != "PROCESSING_HALTED").then(|| (item["referenceId"].as_str().unwrap_or_default().to_owned(), e))
            });
            let Some((reference, (status, code, message, fields))) = culprit else {
                let error = HandlerError::transient("graph_failed", "graph failed without a reported cause");
                out.extend(g.records.iter().map(|i| (*i, Verdict::graph_failed(error.clone()))));
                return out;
            };
            let object = reference_object(&reference);
            let error = classify(status, &code, &format!("{object}: {message}"), &fields, self.quota_pause);
            tracing::info!(error_code = %code, object, class = error.class.as_str(), "graph refused");
            let culprits: &[usize] = match g.owners.get(&reference) {
                Some(Owner::Record(culprit)) => std::slice::from_ref(culprit),
                Some(Owner::Customer(records)) => records,
                None => &g.records,
            };
            match culprits {
                culprits if error.class == ErrorClass::Permanent => {
                    for i in &g.records {
                        let verdict = if culprits.contains(i) {
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
            out
        }
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
