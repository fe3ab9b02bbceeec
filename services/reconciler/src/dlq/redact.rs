//! What `dlq show` and `dlq list` print without `--reveal`: personal data hidden.
//!
//! Values are shown by allowlist: only fields known to carry no personal data (ids, types,
//! states, amounts, timestamps, SKUs, hashes) keep their value; every other field of any
//! payload (Elo's events or a raw Magento record with `customer_taxvat`, `remote_ip`, ...)
//! reads `<redacted>`. A payload that is not JSON shows as its size and hash. Free text (the
//! error message, unknown headers) has e-mails and phone-like digit runs masked.

use serde_json::{Value, json};
use sha2::{Digest, Sha256};

pub const REDACTED: &str = "<redacted>";

/// Fields whose values are never personal.
const SAFE_FIELDS: &[&str] = &[
    "attempts",
    "base_currency_code",
    "base_grand_total",
    "command_id",
    "command_type",
    "consent",
    "country_id",
    "created_at",
    "currency",
    "customer_id",
    "customer_key",
    "discount",
    "entity_id",
    "entity_type",
    "error_class",
    "error_code",
    "event_id",
    "event_type",
    "grand_total",
    "group_id",
    "increment_id",
    "inventory_status",
    "is_guest",
    "item_id",
    "latency_ms",
    "legal_basis",
    "low_stock_threshold",
    "occurred_at",
    "order_currency_code",
    "order_increment_id",
    "outcome_id",
    "parent_item_id",
    "payment_method",
    "price",
    "produced_at",
    "product_id",
    "product_type",
    "qty_ordered",
    "reason",
    "requested_at",
    "requested_by",
    "row_total",
    "salable_qty",
    "shipping_method",
    "sink",
    "sku",
    "source_system",
    "state",
    "status",
    "stock_id",
    "store_code",
    "store_id",
    "subtotal",
    "target",
    "target_service",
    "tax",
    "total_qty_ordered",
    "updated_at",
    "website_id",
];

/// Headers whose values carry no personal data: Elo's own bookkeeping, and W3C trace context
/// (`tracestate` holds vendor tracing state only; Elo sets none, it passes through).
const SAFE_HEADERS: &[&str] = &["traceparent", "tracestate", "content-type"];

fn safe_field(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    SAFE_FIELDS.contains(&k.as_str()) || k.ends_with("_sha256")
}

/// Hides every value not under a known non-personal field, at any depth.
pub fn value(v: &mut Value) {
    match v {
        Value::Object(map) => {
            for (k, v) in map.iter_mut() {
                field(k, v);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(value),
        Value::Null | Value::Bool(_) => {}
        _ => *v = json!(REDACTED),
    }
}

fn field(key: &str, v: &mut Value) {
    match v {
        Value::Object(_) => value(v),
        Value::Array(items) if items.iter().any(|i| i.is_object() || i.is_array()) => value(v),
        Value::Null | Value::Bool(_) => {}
        _ if safe_field(key) => {}
        _ => *v = json!(REDACTED),
    }
}

/// A payload that is not JSON: its size and hash (enough to tell two apart), never its text.
pub fn opaque(payload: &[u8]) -> Value {
    let hash: String = Sha256::digest(payload).iter().map(|b| format!("{b:02x}")).collect();
    json!(format!("<{} bytes, sha256 {hash}>", payload.len()))
}

/// A header's value as shown: Elo's own headers and trace context as they are, the error
/// message and anything else with e-mails and phone-like numbers masked.
pub fn header(name: &str, value: &str) -> String {
    let n = name.to_ascii_lowercase();
    let own = (n.starts_with("elo-dlq-") && n != elo_kafka::dlq::ERROR_MESSAGE) || n.starts_with("elo-replay-");
    if own || SAFE_HEADERS.contains(&n.as_str()) { value.to_owned() } else { text(value) }
}

/// Masks e-mail addresses (any word with `@`) and runs of 6+ digits (phones, tax ids, even
/// when written with spaces, dots, dashes, slashes, brackets or a leading `+`).
pub fn text(input: &str) -> String {
    let masked: Vec<String> =
        input.split(' ').map(|w| if w.contains('@') { REDACTED.to_owned() } else { w.to_owned() }).collect();
    let joined = masked.join(" ");
    let chars: Vec<char> = joined.chars().collect();
    let mut out = String::with_capacity(joined.len());
    let mut i = 0;
    while i < chars.len() {
        if chars[i].is_ascii_digit() || (chars[i] == '+' && chars.get(i + 1).is_some_and(char::is_ascii_digit)) {
            // The longest run of digits and separators from here, trimmed to end on a digit.
            let mut j = i;
            let mut last_digit = i;
            let mut digits = 0;
            while j < chars.len() && (chars[j].is_ascii_digit() || " .-/()+".contains(chars[j])) {
                if chars[j].is_ascii_digit() {
                    digits += 1;
                    last_digit = j;
                }
                j += 1;
            }
            if digits >= 6 {
                out.push_str(REDACTED);
                i = last_digit + 1;
                continue;
            }
            out.extend(&chars[i..=last_digit]);
            i = last_digit + 1;
            continue;
        }
        out.push(chars[i]);
        i += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_known_fields_keep_their_values_at_any_depth() {
        let mut v = json!({"customer": {"email": "a@b.c", "firstname": "Ana", "phone": null, "customer_id": 7},
            "erasure": {"email_sha256": "ab"}, "items": [{"street": ["x"], "sku": "S1"}],
            "order": {"increment_id": "1", "customer_taxvat": "123.456.789-09", "vat_id": "9",
            "customer_dob": "1990-01-01", "remote_ip": "10.0.0.1", "x_forwarded_for": "1.2.3.4",
            "city": "Rio", "postcode": "01000-000", "middlename": "M", "company": "ACME"},
            "customer_key": "c:42", "target_ids": {"salesforce": "003x"}});
        value(&mut v);
        for path in ["/customer/email", "/customer/firstname", "/items/0/street", "/target_ids/salesforce"] {
            assert_eq!(v.pointer(path).unwrap(), REDACTED, "{path}");
        }
        for k in [
            "customer_taxvat",
            "vat_id",
            "customer_dob",
            "remote_ip",
            "x_forwarded_for",
            "city",
            "postcode",
            "middlename",
            "company",
        ] {
            assert_eq!(v["order"][k], REDACTED, "{k}");
        }
        assert_eq!(v["customer"]["phone"], Value::Null);
        assert_eq!(v["customer"]["customer_id"], 7);
        assert_eq!(v["erasure"]["email_sha256"], "ab");
        assert_eq!(v["items"][0]["sku"], "S1");
        assert_eq!(v["order"]["increment_id"], "1");
        assert_eq!(v["customer_key"], "c:42");
    }

    #[test]
    fn free_text_loses_emails_and_phone_like_numbers_not_short_figures() {
        let t =
            text("DUPLICATES_DETECTED: ana@x.com.br, tel +55 (11) 98765-4321, CPF 123.456.789-09, 3 tries, HTTP 400");
        assert!(!t.contains("ana@") && !t.contains("98765") && !t.contains("789"), "{t}");
        assert!(t.contains("3 tries") && t.contains("HTTP 400") && t.starts_with("DUPLICATES_DETECTED"), "{t}");
        assert_eq!(header("traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01").len(), 55);
        assert_eq!(header(elo_kafka::dlq::ERROR_MESSAGE, "call 11987654321"), format!("call {REDACTED}"));
        assert_eq!(header(elo_kafka::dlq::ERROR_CODE, "E1"), "E1");
    }
}
