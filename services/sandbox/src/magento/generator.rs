//! A seeded, realistic order stream: returning customers and guests, two stores, simple,
//! configurable and bundle products, status transitions (new → processing → complete,
//! cancellations, refunds) and stock depletion. The same seed and start time always give the
//! same orders.

use rand::rngs::StdRng;
use rand::{RngExt, SeedableRng};
use serde_json::{Value, json};

use super::{Catalog, Customer, Magento, Product, ProductKind, fmt_ts};

/// Generator settings.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct GeneratorConfig {
    pub seed: u64,
    /// First order's `created_at`, ms since the epoch (UTC).
    pub start_ms: i64,
    /// Simulated time between orders.
    pub spacing_ms: i64,
    /// Share of orders placed by guests.
    pub guest_rate: f64,
    /// Share of orders that advance an earlier order's status instead of placing a new one.
    pub transition_rate: f64,
}

impl Default for GeneratorConfig {
    fn default() -> Self {
        Self { seed: 42, start_ms: 1_793_491_200_000, spacing_ms: 1_000, guest_rate: 0.3, transition_rate: 0.25 }
    }
}

/// The generator's position, so a stream can be continued.
pub struct Generator {
    rng: StdRng,
    pub config: GeneratorConfig,
    pub step: i64,
}

const FIRST_NAMES: &[&str] = &[
    "Ana", "Bruno", "Carla", "Diego", "Elisa", "Felipe", "Gabriela", "Heitor", "Isabela", "João", "Larissa", "Marcos",
];
const LAST_NAMES: &[&str] =
    &["Souza", "Silva", "Oliveira", "Santos", "Pereira", "Lima", "Costa", "Ribeiro", "Almeida", "Carvalho"];
const CITIES: &[(&str, &str, &str)] = &[
    ("São Paulo", "SP", "01305-000"),
    ("Rio de Janeiro", "RJ", "20040-002"),
    ("Belo Horizonte", "MG", "30130-010"),
    ("Curitiba", "PR", "80010-000"),
    ("Porto Alegre", "RS", "90010-150"),
    ("Recife", "PE", "50030-230"),
];
const PAYMENTS: &[&str] = &["checkmo", "braintree", "pix", "boleto"];

impl Generator {
    pub fn new(config: GeneratorConfig) -> Self {
        Self { rng: StdRng::seed_from_u64(config.seed), config, step: 0 }
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.rng.random_range(0..items.len())]
    }

    /// Produces `count` facts (new orders or status changes) into the store.
    pub fn run(&mut self, magento: &mut Magento, count: usize) -> usize {
        let mut placed = 0;
        for _ in 0..count {
            self.step += 1;
            let now = self.config.start_ms + self.step * self.config.spacing_ms;
            let transition = !magento.orders.is_empty() && self.rng.random::<f64>() < self.config.transition_rate;
            if transition {
                self.transition(magento, now);
            } else {
                self.place(magento, now);
                placed += 1;
            }
        }
        placed
    }

    fn address(&mut self, first: &str, last: &str, email: &str) -> Value {
        let (city, region, postcode) = *self.pick(CITIES);
        let number = self.rng.random_range(1..2000);
        json!({
            "address_type": "billing", "firstname": first, "lastname": last, "email": email,
            "street": [format!("Rua das Flores, {number}")], "city": city, "region": region, "region_code": region,
            "region_id": 508, "postcode": postcode, "country_id": "BR",
            "telephone": format!("+55 11 9{:04}-{:04}", self.rng.random_range(0..10_000), self.rng.random_range(0..10_000)),
        })
    }

    fn customer(&mut self, magento: &mut Magento, now: i64) -> Option<Customer> {
        if self.rng.random::<f64>() < self.config.guest_rate {
            return None;
        }
        // Returning customers: most orders come from the existing base.
        if !magento.customers.is_empty() && self.rng.random::<f64>() < 0.6 {
            let last = magento.customers.last_key_value().map_or(1, |(id, _)| *id);
            let id = self.rng.random_range(1..=last);
            // A deleted customer's id falls through to a new registration.
            if let Some(customer) = magento.customers.get(&id) {
                return Some(customer.clone());
            }
        }
        // After the last id, not the count: deleted customers leave gaps.
        let id = magento.customers.last_key_value().map_or(1, |(id, _)| id + 1);
        let (first, last) = (*self.pick(FIRST_NAMES), *self.pick(LAST_NAMES));
        let email = format!("{}.{}{}@example.com", first.to_lowercase().replace('ã', "a"), last.to_lowercase(), id);
        let address = self.address(first, last, &email);
        let store_id = self.rng.random_range(1..=2);
        let customer = Customer {
            id,
            email,
            firstname: first.into(),
            lastname: last.into(),
            store_id,
            subscribed: self.rng.random::<f64>() < 0.7,
            created_ms: now,
            updated_ms: now,
            address,
        };
        magento.customers.insert(id, customer.clone());
        magento.notify_customer(&customer.to_json(), false);
        Some(customer)
    }

    fn place(&mut self, magento: &mut Magento, now: i64) {
        let customer = self.customer(magento, now);
        let (first, last, email) = match &customer {
            Some(c) => (c.firstname.clone(), c.lastname.clone(), c.email.clone()),
            None => {
                let (f, l) = (*self.pick(FIRST_NAMES), *self.pick(LAST_NAMES));
                let n = self.rng.random_range(0..5_000);
                (f.to_owned(), l.to_owned(), format!("guest{n}@example.org"))
            }
        };
        let store_id = customer.as_ref().map_or_else(|| self.rng.random_range(1..=2), |c| c.store_id);
        let address = customer.as_ref().map_or_else(|| self.address(&first, &last, &email), |c| c.address.clone());
        let lines = self.rng.random_range(1..=3);
        let mut items = Vec::new();
        let order_id = magento.orders.len() as i64 + 1;
        let mut item_id = order_id * 10;
        let (mut subtotal, mut qty_total) = (0.0f64, 0.0f64);
        for _ in 0..lines {
            let product = self.pick(&magento.catalog.products).clone();
            let qty = self.rng.random_range(1..=3) as f64;
            item_id += 1;
            let lines_of = build_lines(&magento.catalog, &product, qty, order_id, &mut item_id);
            for (sku, sold) in lines_of.1 {
                magento.reserve(&sku, sold);
            }
            subtotal += lines_of.2;
            qty_total += qty;
            items.extend(lines_of.0);
        }
        let shipping = 15.0;
        let discount = if self.rng.random::<f64>() < 0.2 { -(subtotal * 0.1).round() } else { 0.0 };
        let subtotal = money(subtotal);
        let grand_total = money(subtotal + shipping + discount);
        let payment = *self.pick(PAYMENTS);
        let created = fmt_ts(now);
        let mut billing = address.clone();
        billing["firstname"] = json!(first);
        billing["lastname"] = json!(last);
        billing["email"] = json!(email);
        let mut shipping_address = billing.clone();
        shipping_address["address_type"] = json!("shipping");
        let order = json!({
            "entity_id": order_id,
            "increment_id": format!("{:09}", order_id),
            "state": "new",
            "status": "pending",
            "customer_email": email,
            "customer_firstname": first,
            "customer_lastname": last,
            "customer_id": customer.as_ref().map(|c| c.id),
            "customer_is_guest": if customer.is_some() { 0 } else { 1 },
            "customer_group_id": if customer.is_some() { 1 } else { 0 },
            "grand_total": grand_total,
            "base_grand_total": grand_total,
            "subtotal": subtotal,
            "base_subtotal": subtotal,
            "tax_amount": 0,
            "base_tax_amount": 0,
            "shipping_amount": shipping,
            "base_shipping_amount": shipping,
            "discount_amount": discount,
            "base_discount_amount": discount,
            "order_currency_code": "BRL",
            "base_currency_code": "BRL",
            "total_qty_ordered": qty_total,
            "store_id": store_id,
            "created_at": created,
            "updated_at": created,
            "items": items,
            "billing_address": billing,
            "payment": {"method": payment, "amount_ordered": grand_total, "additional_information": []},
            "status_histories": [{"comment": null, "created_at": created, "entity_name": "order", "status": "pending", "is_customer_notified": 0}],
            "extension_attributes": {
                "shipping_assignments": [{
                    "shipping": {"address": shipping_address, "method": "flatrate_flatrate", "total": {"shipping_amount": shipping, "base_shipping_amount": shipping}},
                    "items": items,
                }],
            },
        });
        magento.orders.insert(order_id, order);
        magento.notify(order_id);
    }

    fn transition(&mut self, magento: &mut Magento, now: i64) {
        let id = self.rng.random_range(1..=magento.orders.len() as i64);
        let roll: f64 = self.rng.random();
        let Some(order) = magento.orders.get_mut(&id) else { return };
        let next = match (order["state"].as_str().unwrap_or_default(), roll) {
            ("new", r) if r < 0.15 => Some(("canceled", "canceled")),
            ("new", _) => Some(("processing", "processing")),
            ("processing", r) if r < 0.1 => Some(("closed", "closed")),
            ("processing", _) => Some(("complete", "complete")),
            ("complete", r) if r < 0.05 => Some(("closed", "closed")),
            _ => None,
        };
        if let Some((state, status)) = next {
            match state {
                // Completing ships the order (deducts the source); cancelling or refunding an
                // unshipped order releases what it held.
                "complete" => {
                    let _ = magento.ship(id);
                }
                "canceled" | "closed" => magento.release(id),
                _ => {}
            }
            let Some(order) = magento.orders.get_mut(&id) else { return };
            let ts = fmt_ts(now);
            order["state"] = json!(state);
            order["status"] = json!(status);
            order["updated_at"] = json!(ts);
            if let Some(h) = order["status_histories"].as_array_mut() {
                h.insert(0, json!({"comment": format!("Order {status}"), "created_at": ts, "entity_name": "order", "status": status, "is_customer_notified": 0}));
            }
            magento.notify(id);
        }
    }
}

/// Money as Magento stores it (decimal(20,4)), so JSON numbers carry no float noise.
fn money(x: f64) -> f64 {
    (x * 10_000.0).round() / 10_000.0
}

/// Magento's flat item lines for one product: (lines, (sku, qty) depleted, row total).
fn build_lines(
    catalog: &Catalog,
    product: &Product,
    qty: f64,
    order_id: i64,
    item_id: &mut i64,
) -> (Vec<Value>, Vec<(String, f64)>, f64) {
    let line = |id: i64, sku: &str, name: &str, kind: &str, price: f64, parent: Option<i64>| {
        json!({
            "item_id": id, "order_id": order_id, "sku": sku, "name": name, "product_id": catalog.product_id(sku),
            "product_type": kind, "qty_ordered": qty, "price": price, "base_price": price, "row_total": money(price * qty),
            "base_row_total": money(price * qty), "tax_amount": 0, "discount_amount": 0, "parent_item_id": parent,
        })
    };
    match &product.kind {
        ProductKind::Simple => (
            vec![line(*item_id, &product.sku, &product.name, "simple", product.price, None)],
            vec![(product.sku.clone(), qty)],
            product.price * qty,
        ),
        ProductKind::Configurable { children } => {
            // The parent line carries the child's SKU and the price; the child line has price 0
            // and points to its parent (saas-apis.md §1, "items[] is flat").
            let child = &children[(*item_id as usize) % children.len()];
            let parent_id = *item_id;
            let parent = line(parent_id, child, &product.name, "configurable", product.price, None);
            *item_id += 1;
            let mut child_line = line(
                *item_id,
                child,
                &format!("{} ({})", product.name, child.rsplit('-').next().unwrap_or("")),
                "simple",
                0.0,
                Some(parent_id),
            );
            child_line["parent_item"] = parent.clone();
            (vec![parent, child_line], vec![(child.clone(), qty)], product.price * qty)
        }
        ProductKind::Bundle { children } => {
            let parent_id = *item_id;
            let total: f64 = children.iter().map(|c| catalog.price(c)).sum();
            // Dynamic-price bundle: the parent line has price 0, the children carry theirs.
            let mut lines = vec![line(parent_id, &product.sku, &product.name, "bundle", 0.0, None)];
            let mut sold = Vec::new();
            for child in children {
                *item_id += 1;
                let mut l =
                    line(*item_id, child, &catalog.name(child), "simple", catalog.price(child), Some(parent_id));
                l["parent_item"] = lines[0].clone();
                lines.push(l);
                sold.push((child.clone(), qty));
            }
            (lines, sold, total * qty)
        }
    }
}
