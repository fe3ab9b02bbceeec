//! Deterministic sample events for tests, benchmarks and the local demo: the same `n` always
//! gives the same event.

use crate::{
    Address, CommerceEvent, CommerceEventType, ConsentStatus, Customer, Decimal4, InventoryStatus, MarketingConsent,
    Order, OrderItem, OrderTotals, SourceVersion, StoreRef, ids,
};

/// 2026-11-01T00:00:00Z in milliseconds.
const BASE_MS: i64 = 1_793_491_200_000;

/// An ORDER_PLACED event for order `n`: every third order is a guest's, customers repeat.
pub fn order_placed(n: u64) -> CommerceEvent {
    let guest = n % 3 == 2;
    let customer_id = (!guest).then_some((n % 97) as i64 + 1);
    let email = format!("customer{}@example.com", n % 97);
    let updated_at = BASE_MS + (n as i64) * 1_000;
    let entity_id = n as i64 + 1;
    let qty = Decimal4::from_units((n % 4) as i64 + 1);
    let price = Decimal4::from_unscaled(19_990_000 + (n % 50) as i64 * 10_000);
    let row_total = Decimal4::from_unscaled(price.unscaled() * qty.unscaled() / Decimal4::SCALE);
    let shipping = Decimal4::from_units(15);
    let address = Address {
        firstname: Some("Ana".into()),
        lastname: Some("Souza".into()),
        street: vec!["Rua Augusta, 100".into()],
        city: Some("São Paulo".into()),
        region: Some("São Paulo".into()),
        region_code: Some("SP".into()),
        postcode: Some("01305-000".into()),
        country_id: Some("BR".into()),
        telephone: Some("+55 11 90000-0000".into()),
    };
    CommerceEvent {
        event_id: ids::event_id(&["magento", "order", &entity_id.to_string(), &updated_at.to_string()]),
        event_type: CommerceEventType::OrderPlaced,
        source_system: "magento".into(),
        source_version: SourceVersion { entity_type: "order".into(), entity_id: entity_id.to_string(), updated_at },
        occurred_at: updated_at,
        produced_at: updated_at + 250,
        customer_key: ids::customer_key(customer_id, &email),
        store: StoreRef {
            store_id: (n % 2) as i32 + 1,
            store_code: Some(if n.is_multiple_of(2) { "default".into() } else { "br".into() }),
            website_id: Some(1),
        },
        order: Some(Order {
            entity_id,
            increment_id: format!("{:09}", entity_id),
            state: "new".into(),
            status: "pending".into(),
            currency: "BRL".into(),
            created_at: updated_at,
            totals: OrderTotals {
                grand_total: row_total.checked_add(shipping).expect("small sample values"),
                subtotal: row_total,
                tax: Decimal4::ZERO,
                shipping,
                discount: Decimal4::ZERO,
                total_qty_ordered: qty,
            },
            items: vec![OrderItem {
                item_id: entity_id * 10,
                sku: format!("SKU-{:04}", n % 200),
                name: format!("Product {}", n % 200),
                product_id: Some((n % 200) as i64 + 1),
                product_type: "simple".into(),
                qty_ordered: qty,
                price,
                row_total,
                tax: Decimal4::ZERO,
                discount: Decimal4::ZERO,
                parent_item_id: None,
            }],
            billing_address: Some(address.clone()),
            shipping_address: Some(address),
            payment_method: Some("checkmo".into()),
            shipping_method: Some("flatrate_flatrate".into()),
            inventory_status: InventoryStatus::Ok,
        }),
        customer: Some(Customer {
            customer_id,
            is_guest: guest,
            email,
            firstname: Some("Ana".into()),
            lastname: Some("Souza".into()),
            group_id: Some(if guest { 0 } else { 1 }),
            phone: None,
            consent: MarketingConsent {
                status: if n.is_multiple_of(5) { ConsentStatus::Declined } else { ConsentStatus::Granted },
                legal_basis: Some("consent".into()),
                updated_at: Some(BASE_MS),
            },
        }),
        erasure: None,
    }
}
