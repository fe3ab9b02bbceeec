//! The store's catalog (simple, configurable and bundle products) and its customers.

use std::collections::BTreeMap;

use serde_json::{Value, json};

use super::fmt_ts;

#[derive(Clone, Debug)]
pub enum ProductKind {
    Simple,
    Configurable { children: Vec<String> },
    Bundle { children: Vec<String> },
}

#[derive(Clone, Debug)]
pub struct Product {
    pub id: i64,
    pub sku: String,
    pub name: String,
    pub price: f64,
    pub kind: ProductKind,
}

/// The catalog: sellable products (simple, configurable, bundle) plus configurable children.
#[derive(Clone, Debug)]
pub struct Catalog {
    pub products: Vec<Product>,
    pub all: BTreeMap<String, Product>,
}

impl Catalog {
    pub(super) fn build() -> Self {
        let mut all = BTreeMap::new();
        let mut products = Vec::new();
        let mut id = 0;
        let mut add = |sku: String,
                       name: String,
                       price: f64,
                       kind: ProductKind,
                       sellable: bool,
                       all: &mut BTreeMap<String, Product>| {
            id += 1;
            let p = Product { id, sku: sku.clone(), name, price, kind };
            all.insert(sku, p.clone());
            if sellable {
                products.push(p);
            }
        };
        for n in 1..=30 {
            add(
                format!("SKU-{n:03}"),
                format!("Produto {n}"),
                9.9 + f64::from(n) * 5.0,
                ProductKind::Simple,
                true,
                &mut all,
            );
        }
        for n in 1..=5 {
            let children: Vec<String> = ["P", "M", "G"].iter().map(|s| format!("CAMISETA-{n}-{s}")).collect();
            for c in &children {
                add(
                    c.clone(),
                    format!("Camiseta {n} {}", c.rsplit('-').next().unwrap_or("")),
                    59.9,
                    ProductKind::Simple,
                    false,
                    &mut all,
                );
            }
            add(
                format!("CAMISETA-{n}"),
                format!("Camiseta {n}"),
                59.9,
                ProductKind::Configurable { children },
                true,
                &mut all,
            );
        }
        for n in 1..=3 {
            let children = vec![format!("SKU-{:03}", n * 3), format!("SKU-{:03}", n * 3 + 1)];
            add(format!("KIT-{n}"), format!("Kit presente {n}"), 0.0, ProductKind::Bundle { children }, true, &mut all);
        }
        Self { products, all }
    }

    pub fn product_id(&self, sku: &str) -> Option<i64> {
        self.all.get(sku).map(|p| p.id)
    }
    pub fn price(&self, sku: &str) -> f64 {
        self.all.get(sku).map_or(0.0, |p| p.price)
    }
    pub fn name(&self, sku: &str) -> String {
        self.all.get(sku).map_or_else(|| sku.to_owned(), |p| p.name.clone())
    }
}

#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Customer {
    pub id: i64,
    pub email: String,
    pub firstname: String,
    pub lastname: String,
    pub store_id: i64,
    pub subscribed: bool,
    pub created_ms: i64,
    pub updated_ms: i64,
    pub address: Value,
}

impl Customer {
    pub fn to_json(&self) -> Value {
        let mut address = self.address.clone();
        address["id"] = json!(self.id);
        address["customer_id"] = json!(self.id);
        address["default_billing"] = json!(true);
        address["default_shipping"] = json!(true);
        address["region"] =
            json!({"region_code": address["region_code"], "region": address["region"], "region_id": 508});
        json!({
            "id": self.id, "group_id": 1, "email": self.email, "firstname": self.firstname, "lastname": self.lastname,
            "store_id": self.store_id, "website_id": 1, "created_at": fmt_ts(self.created_ms), "updated_at": fmt_ts(self.updated_ms),
            "created_in": if self.store_id == 1 { "Default Store View" } else { "Loja BR" },
            "default_billing": self.id.to_string(), "default_shipping": self.id.to_string(), "addresses": [address],
            "disable_auto_group_change": 0,
            "extension_attributes": {"is_subscribed": self.subscribed},
            "custom_attributes": [],
        })
    }
}
