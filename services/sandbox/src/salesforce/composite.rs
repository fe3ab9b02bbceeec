//! Composite (`POST /composite`, at most 25 subrequests, `@{ref}` references) and Composite
//! Graph (`POST /composite/graph`).

use std::collections::BTreeMap;

use axum::http::{HeaderMap, Method};
use serde_json::{Value, json};

use super::model::{SfResponse, scalar_text};
use super::{Salesforce, json_parse_error};

impl Salesforce {
    /// Runs composite subrequests in order, resolving `@{ref.path}`; returns the per-item
    /// responses and whether all succeeded. With `all_or_none`, a failure rolls back the org.
    fn run_subrequests(
        &mut self,
        version: &str,
        requests: &[Value],
        all_or_none: bool,
        headers: &HeaderMap,
    ) -> (Vec<Value>, bool) {
        let savepoint = all_or_none.then(|| self.org.savepoint());
        let mut results: BTreeMap<String, Value> = BTreeMap::new();
        let mut items = Vec::new();
        let mut failed_at = None;
        for (i, request) in requests.iter().enumerate() {
            let reference = request.get("referenceId").and_then(Value::as_str).unwrap_or_default().to_owned();
            if failed_at.is_some() && all_or_none {
                items.push(json!({"body": [{"errorCode": "PROCESSING_HALTED", "message": "The transaction was rolled back since another operation in the same transaction failed."}], "httpHeaders": {}, "httpStatusCode": 400, "referenceId": reference}));
                continue;
            }
            let response = match resolve_references(request, &results) {
                Err(missing) => SfResponse::error(
                    400,
                    "PROCESSING_HALTED",
                    format!(
                        "Invalid reference specified. No value for {missing} found. Provided referenceId must be a valid reference to a preceding sub request."
                    ),
                ),
                Ok(request) => {
                    let method = request
                        .get("method")
                        .and_then(Value::as_str)
                        .unwrap_or("GET")
                        .parse::<Method>()
                        .unwrap_or(Method::GET);
                    let url = request.get("url").and_then(Value::as_str).unwrap_or_default();
                    let (path, query) = url.split_once('?').unwrap_or((url, ""));
                    let prefix = format!("/services/data/{version}");
                    match path.strip_prefix(&prefix) {
                        Some(rest) => self.execute(
                            version,
                            &method,
                            rest,
                            query,
                            request.get("body").unwrap_or(&Value::Null),
                            headers,
                        ),
                        None => SfResponse::error(400, "INVALID_REQUEST", format!("url must start with {prefix}")),
                    }
                }
            };
            if response.is_success() {
                if let Some(body) = &response.body {
                    results.insert(reference.clone(), body.clone());
                }
            } else if failed_at.is_none() {
                failed_at = Some(i);
            }
            items.push(json!({"body": response.body.clone().unwrap_or(Value::Null), "httpHeaders": {}, "httpStatusCode": response.status, "referenceId": reference}));
        }
        match (failed_at, savepoint) {
            (Some(_), Some(savepoint)) => self.org.rollback(savepoint),
            (None, Some(savepoint)) => self.org.release(savepoint),
            _ => {}
        }
        if let (Some(failed), true) = (failed_at, all_or_none) {
            for item in items.iter_mut().take(failed) {
                *item = json!({"body": [{"errorCode": "PROCESSING_HALTED", "message": "The transaction was rolled back since another operation in the same transaction failed."}], "httpHeaders": {}, "httpStatusCode": 400, "referenceId": item["referenceId"]});
            }
        }
        (items, failed_at.is_none())
    }

    pub(super) fn composite(&mut self, version: &str, body: &Value, headers: &HeaderMap) -> SfResponse {
        let Some(requests) = body.get("compositeRequest").and_then(Value::as_array) else { return json_parse_error() };
        if requests.len() > 25 {
            return SfResponse::error(
                400,
                "INVALID_INPUT",
                format!("The composite request has {} subrequests; the limit is 25.", requests.len()),
            );
        }
        let heavy = requests.iter().filter(|r| is_collection_or_query(r, version)).count();
        if heavy > 5 {
            return SfResponse::error(
                400,
                "INVALID_INPUT",
                format!(
                    "The composite request has {heavy} sObject Collections or query subrequests; at most 5 of the 25 subrequests may be."
                ),
            );
        }
        let all_or_none = body.get("allOrNone").and_then(Value::as_bool).unwrap_or(false);
        let (items, _) = self.run_subrequests(version, &requests.clone(), all_or_none, headers);
        SfResponse::json(200, json!({"compositeResponse": items}))
    }

    pub(super) fn graph(&mut self, version: &str, body: &Value, headers: &HeaderMap) -> SfResponse {
        let Some(graphs) = body.get("graphs").and_then(Value::as_array) else { return json_parse_error() };
        if graphs.len() > 75 {
            return SfResponse::error(
                400,
                "INVALID_INPUT",
                format!("Composite graph request has {} graphs; the limit is 75.", graphs.len()),
            );
        }
        let nodes: usize =
            graphs.iter().map(|g| g.get("compositeRequest").and_then(Value::as_array).map_or(0, Vec::len)).sum();
        if nodes > 500 {
            return SfResponse::error(
                400,
                "INVALID_INPUT",
                format!("Composite graph payload has {nodes} nodes; the limit is 500."),
            );
        }
        let graphs = graphs.clone();
        let mut failed = 0;
        let mut out = Vec::new();
        for graph in &graphs {
            let id = graph.get("graphId").cloned().unwrap_or(Value::Null);
            let requests = graph.get("compositeRequest").and_then(Value::as_array).cloned().unwrap_or_default();
            if failed >= 14 {
                let halted: Vec<Value> = requests
                    .iter()
                    .map(|r| json!({"body": [{"errorCode": "PROCESSING_HALTED", "message": "Processing halted because too many graphs failed."}], "httpHeaders": {}, "httpStatusCode": 400, "referenceId": r.get("referenceId")}))
                    .collect();
                out.push(json!({"graphId": id, "graphResponse": {"compositeResponse": halted}, "isSuccessful": false}));
                continue;
            }
            let (items, ok) = self.run_subrequests(version, &requests, true, headers);
            if !ok {
                failed += 1;
            }
            out.push(json!({"graphId": id, "graphResponse": {"compositeResponse": items}, "isSuccessful": ok}));
        }
        SfResponse::json(200, json!({"graphs": out}))
    }
}

/// sObject Collections (`/composite/sobjects...`) and query (`/query`, `/queryAll`) subrequests,
/// of which Composite takes at most 5 ("Composite", resources_composite_composite_post).
fn is_collection_or_query(request: &Value, version: &str) -> bool {
    let url = request.get("url").and_then(Value::as_str).unwrap_or_default();
    let path = url.split('?').next().unwrap_or_default();
    let rest = path.strip_prefix(&format!("/services/data/{version}")).unwrap_or(path);
    rest.starts_with("/composite/sobjects") || rest.starts_with("/query") || rest.starts_with("/queryAll")
}

/// Replaces `@{ref.path}` in a subrequest (url and body) with values of earlier results.
fn resolve_references(request: &Value, results: &BTreeMap<String, Value>) -> Result<Value, String> {
    fn lookup(results: &BTreeMap<String, Value>, expr: &str) -> Option<Value> {
        let mut parts = expr.split('.');
        let mut current = results.get(parts.next()?)?.clone();
        for part in parts {
            let (name, index) = match part.split_once('[') {
                Some((n, rest)) => (n, rest.trim_end_matches(']').parse::<usize>().ok()),
                None => (part, None),
            };
            if !name.is_empty() {
                current = current.get(name)?.clone();
            }
            if let Some(i) = index {
                current = current.get(i)?.clone();
            }
        }
        Some(current)
    }
    fn walk(value: &Value, results: &BTreeMap<String, Value>) -> Result<Value, String> {
        Ok(match value {
            Value::String(s) => {
                if let Some(expr) = s.strip_prefix("@{").and_then(|r| r.strip_suffix('}'))
                    && !expr.contains("@{")
                {
                    return lookup(results, expr).ok_or_else(|| expr.to_owned());
                }
                let mut out = String::new();
                let mut rest = s.as_str();
                while let Some(start) = rest.find("@{") {
                    out.push_str(&rest[..start]);
                    let end = rest[start..].find('}').ok_or_else(|| rest.to_owned())? + start;
                    let expr = &rest[start + 2..end];
                    out.push_str(&scalar_text(&lookup(results, expr).ok_or_else(|| expr.to_owned())?));
                    rest = &rest[end + 1..];
                }
                out.push_str(rest);
                Value::String(out)
            }
            Value::Array(items) => Value::Array(items.iter().map(|v| walk(v, results)).collect::<Result<_, _>>()?),
            Value::Object(map) => Value::Object(
                map.iter().map(|(k, v)| Ok((k.clone(), walk(v, results)?))).collect::<Result<_, String>>()?,
            ),
            other => other.clone(),
        })
    }
    walk(request, results)
}
