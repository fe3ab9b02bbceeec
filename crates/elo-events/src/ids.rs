//! Deterministic identifiers.
//!
//! The same source fact must always give the same `event_id`, whichever path (push, poll,
//! refetch) saw it and however often, so downstream consumers can drop duplicates.

use sha2::{Digest, Sha256};
use uuid::Uuid;

/// Namespace for Elo's UUIDv5 ids (a fixed random UUID; never change it).
const ELO_NAMESPACE: Uuid = Uuid::from_u128(0x6f1c_2a9e_5d0b_4c61_9a3e_8b7d_41f2_c05a);

/// Deterministic event id from the parts that identify a source fact, e.g.
/// `["magento", "order", "42", "2026-11-28T10:00:00Z", "ORDER_CHANGED"]`.
/// Parts are length-prefixed so `["ab","c"]` and `["a","bc"]` differ.
pub fn event_id(parts: &[&str]) -> String {
    let mut name = Vec::new();
    for part in parts {
        name.extend_from_slice(&(part.len() as u32).to_be_bytes());
        name.extend_from_slice(part.as_bytes());
    }
    Uuid::new_v5(&ELO_NAMESPACE, &name).to_string()
}

/// Lowercases and trims an e-mail so that case and padding do not split one person in two.
pub fn normalise_email(email: &str) -> String {
    email.trim().to_lowercase()
}

/// Hex SHA-256 of the normalised e-mail: lets systems match a person without the address.
pub fn email_sha256(email: &str) -> String {
    let digest = Sha256::digest(normalise_email(email).as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// The partition key of a customer's events: `c:<customer_id>` for registered customers,
/// `g:<email sha256>` for guests, so a guest's orders stay together and in order.
pub fn customer_key(customer_id: Option<i64>, email: &str) -> String {
    match customer_id {
        Some(id) => format!("c:{id}"),
        None => format!("g:{}", email_sha256(email)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_id_is_deterministic_and_unambiguous() {
        let a = event_id(&["magento", "order", "42", "1700000000000"]);
        assert_eq!(a, event_id(&["magento", "order", "42", "1700000000000"]));
        assert_ne!(a, event_id(&["magento", "order", "42", "1700000000001"]));
        assert_ne!(event_id(&["ab", "c"]), event_id(&["a", "bc"]));
        assert_eq!(Uuid::parse_str(&a).unwrap().get_version_num(), 5);
    }

    #[test]
    fn guest_keys_ignore_email_case_and_padding() {
        assert_eq!(customer_key(None, " Ana@Example.COM "), customer_key(None, "ana@example.com"));
        assert_eq!(customer_key(Some(7), "x@y.z"), "c:7");
        assert!(customer_key(None, "a@b.c").starts_with("g:"));
        assert_eq!(customer_key(None, "a@b.c").len(), 2 + 64);
    }
}
