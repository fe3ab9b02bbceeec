//! Rust mirrors of the Avro schemas. Field docs live in the `.avsc` files; a test proves each
//! type round-trips through its schema.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::Decimal4;

/// Milliseconds since the Unix epoch, UTC (Avro `timestamp-millis`).
pub type TimestampMillis = i64;

/// `CommerceEventType` in `commerce.events.avsc`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CommerceEventType {
    OrderPlaced,
    OrderChanged,
    CustomerChanged,
    CustomerErased,
    Unknown,
}

impl CommerceEventType {
    /// The symbol as written on the wire and in the `elo-event-type` header.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::OrderPlaced => "ORDER_PLACED",
            Self::OrderChanged => "ORDER_CHANGED",
            Self::CustomerChanged => "CUSTOMER_CHANGED",
            Self::CustomerErased => "CUSTOMER_ERASED",
            Self::Unknown => "UNKNOWN",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SourceVersion {
    pub entity_type: String,
    pub entity_id: String,
    pub updated_at: TimestampMillis,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoreRef {
    pub store_id: i32,
    pub store_code: Option<String>,
    pub website_id: Option<i32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommerceEvent {
    pub event_id: String,
    pub event_type: CommerceEventType,
    pub source_system: String,
    pub source_version: SourceVersion,
    pub occurred_at: TimestampMillis,
    pub produced_at: TimestampMillis,
    pub customer_key: String,
    pub store: StoreRef,
    pub order: Option<Order>,
    pub customer: Option<Customer>,
    pub erasure: Option<CustomerErasure>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderTotals {
    pub grand_total: Decimal4,
    pub subtotal: Decimal4,
    pub tax: Decimal4,
    pub shipping: Decimal4,
    pub discount: Decimal4,
    pub total_qty_ordered: Decimal4,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct OrderItem {
    pub item_id: i64,
    pub sku: String,
    pub name: String,
    pub product_id: Option<i64>,
    pub product_type: String,
    pub qty_ordered: Decimal4,
    pub price: Decimal4,
    pub row_total: Decimal4,
    pub tax: Decimal4,
    pub discount: Decimal4,
    pub parent_item_id: Option<i64>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Address {
    pub firstname: Option<String>,
    pub lastname: Option<String>,
    pub street: Vec<String>,
    pub city: Option<String>,
    pub region: Option<String>,
    pub region_code: Option<String>,
    pub postcode: Option<String>,
    pub country_id: Option<String>,
    pub telephone: Option<String>,
}

/// `InventoryStatus` in `commerce.events.avsc`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum InventoryStatus {
    Unchecked,
    Ok,
    LowStock,
    Oversold,
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Order {
    pub entity_id: i64,
    pub increment_id: String,
    pub state: String,
    pub status: String,
    pub currency: String,
    pub created_at: TimestampMillis,
    pub totals: OrderTotals,
    pub items: Vec<OrderItem>,
    pub billing_address: Option<Address>,
    pub shipping_address: Option<Address>,
    pub payment_method: Option<String>,
    pub shipping_method: Option<String>,
    pub inventory_status: InventoryStatus,
}

/// `ConsentStatus` in `commerce.events.avsc`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum ConsentStatus {
    Granted,
    Declined,
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MarketingConsent {
    pub status: ConsentStatus,
    pub legal_basis: Option<String>,
    pub updated_at: Option<TimestampMillis>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Customer {
    pub customer_id: Option<i64>,
    pub is_guest: bool,
    pub email: String,
    pub firstname: Option<String>,
    pub lastname: Option<String>,
    pub group_id: Option<i32>,
    pub phone: Option<String>,
    pub consent: MarketingConsent,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CustomerErasure {
    pub customer_id: Option<i64>,
    pub email_sha256: String,
    pub reason: String,
}

/// `InventoryEventType` in `inventory.events.avsc`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum InventoryEventType {
    StockLevel,
    LowStock,
    Oversold,
    Unknown,
}

impl InventoryEventType {
    /// The symbol as written on the wire and in the `elo-event-type` header.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::StockLevel => "STOCK_LEVEL",
            Self::LowStock => "LOW_STOCK",
            Self::Oversold => "OVERSOLD",
            Self::Unknown => "UNKNOWN",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct InventoryEvent {
    pub event_id: String,
    pub event_type: InventoryEventType,
    pub source_system: String,
    pub sku: String,
    pub stock_id: i32,
    pub salable_qty: Decimal4,
    pub low_stock_threshold: Option<Decimal4>,
    pub order_increment_id: Option<String>,
    pub occurred_at: TimestampMillis,
    pub produced_at: TimestampMillis,
}

/// `OutcomeStatus` in `integration.outcomes.avsc`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum OutcomeStatus {
    Applied,
    SkippedStale,
    DeadLettered,
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SyncOutcome {
    pub outcome_id: String,
    pub sink: String,
    pub target: String,
    pub event_id: String,
    pub customer_key: String,
    pub source_version: SourceVersion,
    pub status: OutcomeStatus,
    pub error_class: Option<String>,
    pub error_code: Option<String>,
    pub target_ids: BTreeMap<String, String>,
    pub attempts: i32,
    pub latency_ms: i64,
    pub occurred_at: TimestampMillis,
}

impl SyncOutcome {
    /// The `elo-event-type` header of every outcome record (the schema has one kind of record
    /// and no type enum; the header names the record, `SyncOutcome`, in the symbols' style).
    pub const EVENT_TYPE: &'static str = "SYNC_OUTCOME";
}

/// `CommandType` in `integration.commands.avsc`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum CommandType {
    RefetchOrder,
    RefetchCustomer,
    Resend,
    Unknown,
}

impl CommandType {
    /// The symbol as written on the wire and in the `elo-event-type` header.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RefetchOrder => "REFETCH_ORDER",
            Self::RefetchCustomer => "REFETCH_CUSTOMER",
            Self::Resend => "RESEND",
            Self::Unknown => "UNKNOWN",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct IntegrationCommand {
    pub command_id: String,
    pub command_type: CommandType,
    pub target_service: String,
    pub customer_key: String,
    pub entity_id: String,
    pub store_id: Option<i32>,
    pub reason: String,
    pub requested_by: String,
    pub requested_at: TimestampMillis,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The `elo-event-type` header is the symbol the record itself carries, so a consumer can
    /// route on either and never see two spellings.
    #[test]
    fn header_names_are_the_wire_symbols() {
        fn symbol<T: Serialize>(value: T) -> String {
            serde_json::to_value(value).expect("serialises").as_str().expect("a symbol").to_owned()
        }
        for kind in [
            CommerceEventType::OrderPlaced,
            CommerceEventType::OrderChanged,
            CommerceEventType::CustomerChanged,
            CommerceEventType::CustomerErased,
            CommerceEventType::Unknown,
        ] {
            assert_eq!(kind.as_str(), symbol(kind));
        }
        for kind in [
            InventoryEventType::StockLevel,
            InventoryEventType::LowStock,
            InventoryEventType::Oversold,
            InventoryEventType::Unknown,
        ] {
            assert_eq!(kind.as_str(), symbol(kind));
        }
        for kind in [CommandType::RefetchOrder, CommandType::RefetchCustomer, CommandType::Resend, CommandType::Unknown]
        {
            assert_eq!(kind.as_str(), symbol(kind));
        }
    }
}
