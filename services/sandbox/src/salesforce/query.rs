//! SOQL over REST: `GET /query?q=`, paged by `batchSize` with `nextRecordsUrl`.

use axum::http::HeaderMap;
use serde_json::{Map, Value, json};

use super::model::SfResponse;
use super::{Salesforce, query_param, soql};

impl Salesforce {
    pub(super) fn query(&mut self, version: &str, query: &str, headers: &HeaderMap) -> SfResponse {
        let Some(q) = query_param(query, "q") else {
            return SfResponse::error(400, "MALFORMED_QUERY", "A query string has to be specified");
        };
        let parsed = match soql::parse(&q, &self.org.schema) {
            Ok(p) => p,
            Err(e) => return SfResponse::error(400, e.code, e.message),
        };
        let rows: Vec<Value> = soql::run(&parsed, self.org.records.values(), &self.org.schema)
            .into_iter()
            .map(|r| {
                let mut out = Map::new();
                out.insert("attributes".into(), json!({"type": r.object, "url": format!("/services/data/{version}/sobjects/{}/{}", r.object, r.id)}));
                for f in &parsed.fields {
                    out.insert(f.clone(), r.get(f).unwrap_or(Value::Null));
                }
                Value::Object(out)
            })
            .collect();
        let batch = headers
            .get("sforce-query-options")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').find_map(|p| p.trim().strip_prefix("batchSize=")))
            .and_then(|n| n.parse::<usize>().ok())
            .map_or(self.config.query_batch, |n| n.clamp(200, 2000));
        let total = rows.len();
        self.page(version, rows, batch, total)
    }

    /// One page of `rows` (what is left of a result of `total` rows).
    fn page(&mut self, version: &str, mut rows: Vec<Value>, batch: usize, total: usize) -> SfResponse {
        if rows.len() <= batch {
            return SfResponse::json(200, json!({"totalSize": total, "done": true, "records": rows}));
        }
        let rest = rows.split_off(batch);
        let locator = format!("01gSANDBOX{:08x}-{}", rand::random::<u32>(), batch);
        self.cursors.insert(locator.clone(), (total, rest));
        SfResponse::json(
            200,
            json!({"totalSize": total, "done": false, "nextRecordsUrl": format!("/services/data/{version}/query/{locator}"), "records": rows}),
        )
    }

    pub(super) fn query_more(&mut self, version: &str, locator: &str) -> SfResponse {
        let Some((total, rows)) = self.cursors.remove(locator) else {
            return SfResponse::error(400, "INVALID_QUERY_LOCATOR", "invalid query locator");
        };
        let batch = locator.rsplit('-').next().and_then(|b| b.parse().ok()).unwrap_or(self.config.query_batch);
        // totalSize stays the size of the whole result on every page, as Salesforce reports it.
        self.page(version, rows, batch, total)
    }
}
