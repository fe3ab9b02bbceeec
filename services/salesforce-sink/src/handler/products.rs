//! Product2 and PricebookEntry rows the orders need, upserted once and cached.

use std::collections::{BTreeMap, HashMap};

use elo_kafka::HandlerError;
use reqwest::Method;
use serde_json::{Value, json};

use super::{Sink, classify, from_client, item_error};
use crate::graph::{self, Work};

impl Sink {
    /// Upserts the Product2 and PricebookEntry rows the orders need and are not known to
    /// exist: one Composite call (three Collections subrequests) per 200 products. Returns
    /// the records that cannot go on, with why.
    pub(super) async fn ensure_entries(&self, work: &[Work<'_>]) -> HashMap<usize, HandlerError> {
        let mut needed: BTreeMap<String, (i32, String, String, f64, Vec<usize>)> = BTreeMap::new();
        {
            let known = self.entries.lock().expect("entries lock");
            for w in work {
                let Some(order) = &w.event.order else { continue };
                let store = w.event.store.store_id;
                for item in graph::sellable(order) {
                    let key = graph::entry_key(Some(store), &item.sku);
                    if known.contains(&key) {
                        continue;
                    }
                    let price = item.price.unscaled() as f64 / elo_events::Decimal4::SCALE as f64;
                    let entry =
                        needed.entry(key).or_insert((store, item.sku.clone(), item.name.clone(), price, vec![]));
                    entry.4.push(w.index);
                }
            }
        }
        let mut failures = HashMap::new();
        let ids = &self.mapping.ids;
        let version = self.client.api_version().to_owned();
        let all: Vec<_> = needed.into_iter().collect();
        for chunk in all.chunks(200) {
            let products: Vec<Value> = chunk
                .iter()
                .map(|(_, (_, sku, name, _, _))| json!({"attributes": {"type": "Product2"}, ids.product_sku.clone(): sku, "Name": name, "ProductCode": sku, "IsActive": true}))
                .collect();
            let standard: Vec<Value> = chunk
                .iter()
                .map(|(_, (_, sku, _, price, _))| json!({"attributes": {"type": "PricebookEntry"}, ids.pricebook_entry.clone(): graph::entry_key(None, sku), "Pricebook2Id": self.org.standard_pricebook, "Product2": {ids.product_sku.clone(): sku}, "UnitPrice": price, "IsActive": true}))
                .collect();
            let store: Vec<Value> = chunk
                .iter()
                .map(|(key, (store, sku, _, price, _))| json!({"attributes": {"type": "PricebookEntry"}, ids.pricebook_entry.clone(): key, "Pricebook2Id": self.org.pricebooks.get(store), "Product2": {ids.product_sku.clone(): sku}, "UnitPrice": price, "IsActive": true}))
                .collect();
            let sub = |r: &str, url: String, records: Vec<Value>| json!({"method": "PATCH", "url": url, "referenceId": r, "body": {"allOrNone": false, "records": records}});
            let body = json!({"allOrNone": false, "compositeRequest": [
                sub("products", format!("/services/data/{version}/composite/sobjects/Product2/{}", ids.product_sku), products),
                sub("standard", format!("/services/data/{version}/composite/sobjects/PricebookEntry/{}", ids.pricebook_entry), standard),
                sub("store", format!("/services/data/{version}/composite/sobjects/PricebookEntry/{}", ids.pricebook_entry), store),
            ]});
            let response = match self.client.call("composite", Method::POST, "/composite", Some(&body)).await {
                Ok(r) => r,
                Err(e) => {
                    let error = from_client(&e, self.quota_pause);
                    for (_, (_, _, _, _, records)) in chunk {
                        for r in records {
                            failures.insert(*r, error.clone());
                        }
                    }
                    continue;
                }
            };
            let items = response["compositeResponse"].as_array().cloned().unwrap_or_default();
            for (n, (key, (_, _, _, _, records))) in chunk.iter().enumerate() {
                // The first failure of this product's three rows, if any.
                let mut error = None;
                for item in &items {
                    if let Some((status, code, message, fields)) = item_error(item) {
                        error = Some(classify(status, &code, &message, &fields, self.quota_pause));
                        break;
                    }
                    let row = &item["body"][n];
                    if row["success"] != true {
                        let e = &row["errors"][0];
                        let fields: Vec<String> = e["fields"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(|f| f.as_str().map(str::to_owned))
                            .collect();
                        error = Some(classify(
                            400,
                            e["statusCode"].as_str().unwrap_or("unknown"),
                            e["message"].as_str().unwrap_or_default(),
                            &fields,
                            self.quota_pause,
                        ));
                        break;
                    }
                }
                match error {
                    None => {
                        self.entries.lock().expect("entries lock").insert(key.clone());
                    }
                    Some(error) => {
                        for r in records {
                            failures.insert(*r, error.clone());
                        }
                    }
                }
            }
        }
        failures
    }
}
