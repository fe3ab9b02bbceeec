//! MSI as Magento runs it: source items hold the physical quantity; placing an order appends a
//! reservation (salable quantity = source quantity + reservations, reservations negative), a
//! shipment deducts the source and compensates the reservation, a cancellation compensates it
//! ("Reservations", commerce-php inventory-management). Also the legacy stock item API.

use serde_json::{Value, json};

use super::Magento;
use super::search::{self, MagentoError};

/// Whether a `/V1/...` path is an inventory route.
pub(super) fn handles(segments: &[&str]) -> bool {
    matches!(segments, ["inventory", ..] | ["stockItems", _] | ["products", _, "stockItems", _])
}

impl Magento {
    /// The inventory routes (see [`handles`]).
    pub(super) fn inventory(
        &mut self,
        method: &str,
        segments: &[&str],
        query: &str,
        body: &Value,
    ) -> Result<(u16, Value), MagentoError> {
        match (method, segments) {
            ("GET", ["inventory", "source-items"]) => {
                let c = self.search_criteria(query)?;
                let items: Vec<Value> = self
                    .stock
                    .iter()
                    .map(|(sku, (q, s))| json!({"sku": sku, "source_code": "default", "quantity": q, "status": s}))
                    .collect();
                Ok((200, search::run(items, &c, self.default_page_size(), self.config.last_page_repeats)))
            }
            ("POST", ["inventory", "source-items"]) => {
                let items = body.get("sourceItems").and_then(Value::as_array).ok_or_else(|| {
                    MagentoError::new(
                        400,
                        "\"%fieldName\" is required. Enter and try again.",
                        json!({"fieldName": "sourceItems"}),
                    )
                })?;
                if self.config.input_limits && items.len() > super::MAX_LIST_ITEMS {
                    return Err(MagentoError::new(
                        400,
                        "Maximum items of type \"%type\" is %max",
                        json!({"type": "\\Magento\\InventoryApi\\Api\\Data\\SourceItemInterface", "max": super::MAX_LIST_ITEMS}),
                    ));
                }
                for item in items {
                    let (Some(sku), Some(qty)) =
                        (item.get("sku").and_then(Value::as_str), item.get("quantity").and_then(Value::as_f64))
                    else {
                        return Err(MagentoError::new(
                            400,
                            "\"%fieldName\" is required. Enter and try again.",
                            json!({"fieldName": "sku"}),
                        ));
                    };
                    let status = item.get("status").and_then(Value::as_u64).unwrap_or(1) as u8;
                    self.stock.insert(sku.to_owned(), (qty, status));
                }
                Ok((200, json!([])))
            }
            ("GET", ["inventory", "get-product-salable-quantity", sku, stock]) => {
                self.check_stock_id(stock)?;
                Ok((200, json!(self.salable(sku)?)))
            }
            ("GET", ["inventory", "is-product-salable", sku, stock]) => {
                self.check_stock_id(stock)?;
                Ok((200, json!(self.salable(sku)? > 0.0)))
            }
            ("GET", ["inventory", "is-product-salable-for-requested-qty", sku, stock, qty]) => {
                self.check_stock_id(stock)?;
                let qty: f64 = qty.parse().map_err(|_| MagentoError::new(400, "Invalid quantity", json!([])))?;
                let available = self.salable(sku)?;
                Ok((
                    200,
                    if available >= qty {
                        json!({"salable": true, "errors": []})
                    } else {
                        json!({"salable": false, "errors": [{"code": "back_order-disabled", "message": "The requested qty is not available"}]})
                    },
                ))
            }
            ("PUT", ["products", sku, "stockItems", item_id]) => {
                let sku = crate::salesforce::percent_decode(sku);
                let product_id =
                    self.catalog.product_id(&sku).filter(|_| self.stock.contains_key(&sku)).ok_or_else(|| {
                        MagentoError::new(
                            404,
                            "The product that was requested doesn't exist. Verify the product and try again.",
                            json!([]),
                        )
                    })?;
                if item_id.parse::<i64>().ok() != Some(product_id) {
                    return Err(MagentoError::new(
                        400,
                        "The stock item was unable to be saved. Please try again.",
                        json!([]),
                    ));
                }
                let item = body.get("stockItem").or_else(|| body.get("stock_item")).ok_or_else(|| {
                    MagentoError::new(
                        400,
                        "\"%fieldName\" is required. Enter and try again.",
                        json!({"fieldName": "stockItem"}),
                    )
                })?;
                let entry = self.stock.get_mut(&sku).expect("checked above");
                if let Some(qty) = item.get("qty").and_then(Value::as_f64) {
                    entry.0 = qty;
                }
                if let Some(in_stock) = item.get("is_in_stock").and_then(Value::as_bool) {
                    entry.1 = u8::from(in_stock);
                }
                Ok((200, json!(product_id)))
            }
            ("GET", ["stockItems", sku]) => {
                let (qty, status) = self.stock.get(*sku).copied().ok_or_else(|| {
                    MagentoError::new(404, "The Product with the \"%1\" SKU doesn't exist.", json!([sku]))
                })?;
                Ok((
                    200,
                    json!({"item_id": self.catalog.product_id(sku), "product_id": self.catalog.product_id(sku), "stock_id": 1, "qty": qty, "is_in_stock": status == 1, "min_qty": 0, "low_stock_date": null, "manage_stock": true}),
                ))
            }
            _ => Err(MagentoError::new(404, "Request does not match any route.", json!([]))),
        }
    }

    fn check_stock_id(&self, stock: &str) -> Result<(), MagentoError> {
        if stock == "1" {
            Ok(())
        } else {
            Err(MagentoError::new(404, "Stock with id \"%value\" does not exist.", json!({"value": stock})))
        }
    }

    /// Appends a reservation: an order holds `qty` of `sku` (salable quantity drops, the
    /// source quantity stays).
    pub fn reserve(&mut self, sku: &str, qty: f64) {
        *self.reservations.entry(sku.to_owned()).or_default() -= qty;
    }

    /// What an order takes from the source: its simple lines (configurable and bundle parents
    /// carry no stock of their own).
    fn order_lines(order: &Value) -> Vec<(String, f64)> {
        order["items"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|i| i["product_type"] == "simple")
            .filter_map(|i| Some((i["sku"].as_str()?.to_owned(), i["qty_ordered"].as_f64()?)))
            .collect()
    }

    /// Ships an order: the source quantity is deducted and the reservation compensated.
    /// Returns what was deducted, or why it cannot ship.
    pub fn ship(&mut self, order_id: i64) -> Result<Vec<(String, f64)>, String> {
        let order = self.orders.get(&order_id).ok_or("no such order")?;
        if self.shipped.contains(&order_id) {
            return Err("the order has been shipped already".into());
        }
        if matches!(order["state"].as_str(), Some("canceled" | "closed")) {
            return Err(format!("a {} order cannot be shipped", order["state"].as_str().unwrap_or_default()));
        }
        let lines = Self::order_lines(order);
        for (sku, qty) in &lines {
            if let Some((source, status)) = self.stock.get_mut(sku) {
                *source -= qty;
                if *source <= 0.0 {
                    *status = 0;
                }
            }
            *self.reservations.entry(sku.clone()).or_default() += qty;
        }
        self.shipped.insert(order_id);
        Ok(lines)
    }

    /// A cancelled order releases what it held (a compensating reservation).
    pub fn release(&mut self, order_id: i64) {
        if self.shipped.contains(&order_id) {
            return;
        }
        let lines = self.orders.get(&order_id).map(Self::order_lines).unwrap_or_default();
        for (sku, qty) in lines {
            *self.reservations.entry(sku).or_default() += qty;
        }
    }

    /// Source quantity plus reservations.
    fn salable(&self, sku: &str) -> Result<f64, MagentoError> {
        let reserved = self.reservations.get(sku).copied().unwrap_or_default();
        self.stock.get(sku).map(|(q, _)| *q + reserved).ok_or_else(|| {
            MagentoError::new(
                404,
                "The product that was requested doesn't exist. Verify the product and try again.",
                json!([]),
            )
        })
    }
}
