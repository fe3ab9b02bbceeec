//! The RD Station contact rdstation-sink writes for a customer, as fingerprints: what the RD
//! sweep expects to find.
//!
//! The sink builds the contact's name from every customer block it applied, in the order it
//! read them (a block as new as the held identity or newer replaces it; a first or last name
//! the block omits keeps the earlier one: `rdstation_sink::aggregates::merge_name`), then
//! writes first and last name joined by a space, trimmed (and no name at all when empty). The
//! ledger folds the same blocks in the same order (both read `commerce.events`, partition by
//! partition) into one mark per customer key, `contact:<customer key>`, with the same merge
//! function. Only fingerprints of the e-mail and of each name part are kept: unsalted SHA-256
//! prefixes, so pseudonymised, not anonymous (a candidate e-mail or name can be matched against
//! them); the ledger's changelog is personal data in that sense.
//! A listed contact is compared by splitting its name at each space into a first and a last
//! part (whitespace is normalised on both sides, so an edit of whitespace alone is not seen).
//!
//! The mark lives as long as the customer (the sink keeps the identity as long): it goes with
//! the customer's erasure, never by retention, so a later block still merges onto the parts
//! the sink holds.

use elo_events::CommerceEvent;
use serde::{Deserialize, Serialize};

use crate::ledger::{self, Entry};

/// The `kind` of a customer's contact mark.
pub const CONTACT: &str = "contact";

/// The ledger key of a customer key's contact mark.
pub fn contact_key(customer_key: &str) -> String {
    ledger::key(CONTACT, customer_key)
}

/// SHA-256 of a text's words joined by one space.
fn digest(text: &str) -> [u8; 32] {
    use sha2::Digest;
    let words = text.split_whitespace().collect::<Vec<_>>().join(" ");
    sha2::Sha256::digest(words.as_bytes()).into()
}

/// Fingerprint of a text, as kept in the ledger: [`digest`], first 12 bytes in hex.
pub fn fp(text: &str) -> String {
    digest(text).iter().take(12).map(|b| format!("{b:02x}")).collect()
}

/// The first 8 bytes of [`digest`]: what a listing keeps per name split (a listing of a
/// big account is held in memory while it is read).
fn short(text: &str) -> u64 {
    let d = digest(text);
    u64::from_be_bytes([d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7]])
}

/// The first 8 bytes of a kept fingerprint (`None`: not hex, matches nothing listed).
fn short_of(fp: &str) -> Option<u64> {
    fp.get(..16).and_then(|h| u64::from_str_radix(h, 16).ok())
}

/// The contact the sink writes, as fingerprints.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContactPrint {
    /// Source version of the newest customer block applied (the sink's identity version).
    pub version: i64,
    /// The ledger entry whose event brought that block: once RD confirmed it, the sink wrote
    /// this contact.
    #[serde(default)]
    pub key: String,
    /// Fingerprint of the normalised e-mail.
    #[serde(default)]
    pub email: String,
    /// Fingerprints of the first and last name held (`None`: never given).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub first: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last: Option<String>,
}

impl ContactPrint {
    /// Folds a customer block of `version` in, as the sink does; false when older than the
    /// identity held (the sink ignores it too).
    pub fn apply(&mut self, key: &str, customer: &elo_events::Customer, version: i64) -> bool {
        if version < self.version {
            return false;
        }
        self.version = version;
        key.clone_into(&mut self.key);
        self.email = fp(&elo_events::ids::normalise_email(&customer.email));
        let (first, last) = (customer.firstname.as_deref().map(fp), customer.lastname.as_deref().map(fp));
        rdstation_sink::aggregates::merge_name(&mut self.first, &mut self.last, first, last);
        true
    }

    /// Whether a listed contact holds what the sink wrote.
    pub fn matches(&self, listed: &Listed) -> bool {
        if short_of(&self.email) != Some(listed.email) {
            return false;
        }
        let empty = short("");
        let part = |p: &Option<String>| p.as_deref().map_or(Some(empty), short_of);
        let (Some(first), Some(last)) = (part(&self.first), part(&self.last)) else { return false };
        if first == empty && last == empty {
            return true; // no name written: whatever the contact holds is not Elo's
        }
        listed.splits.iter().any(|&(f, l)| f == first && l == last)
    }

    /// The e-mail fingerprint's short form, for finding a listed contact by e-mail.
    pub fn email_short(&self) -> Option<u64> {
        short_of(&self.email)
    }
}

/// A listed contact, as fingerprints: the e-mail, and the name split at each space into a
/// first and a last part (one entry per split, both empty for no name).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Listed {
    pub email: u64,
    pub splits: Vec<(u64, u64)>,
}

impl Listed {
    pub fn of(email: &str, name: &str) -> Self {
        let words: Vec<&str> = name.split_whitespace().collect();
        let splits = (0..=words.len()).map(|k| (short(&words[..k].join(" ")), short(&words[k..].join(" ")))).collect();
        Self { email: short(&elo_events::ids::normalise_email(email)), splits }
    }
}

/// Folds an event's customer block into the customer's contact mark (`mark`: the one held);
/// `None` when there is no block or it changes nothing the sink would.
pub fn fold(mark: Option<Entry>, event: &CommerceEvent, entity_key: &str, now_ms: i64) -> Option<Entry> {
    let customer = event.customer.as_ref()?;
    let mut mark = mark.unwrap_or_else(|| Entry {
        kind: CONTACT.to_owned(),
        entity_id: event.customer_key.clone(),
        customer_key: event.customer_key.clone(),
        ..Entry::default()
    });
    let print = mark.contact.get_or_insert_with(ContactPrint::default);
    if !print.apply(entity_key, customer, event.source_version.updated_at) {
        return None;
    }
    mark.seen_at_ms = now_ms;
    Some(mark)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_name_matches_at_any_split_and_whitespace_is_normalised() {
        let mut print = ContactPrint::default();
        let mut c = elo_events::sample::order_placed(1).customer.unwrap();
        (c.firstname, c.lastname) = (Some("Maria  da".into()), Some("Silva".into()));
        assert!(print.apply("order:1", &c, 10));
        assert!(print.matches(&Listed::of(&c.email.to_uppercase(), " Maria da Silva ")));
        assert!(!print.matches(&Listed::of(&c.email, "Maria da")));
        assert!(!print.matches(&Listed::of("other@example.com", "Maria da Silva")));
        (c.firstname, c.lastname) = (None, None);
        assert!(!print.apply("order:0", &c, 9), "older blocks lose");
        assert!(print.apply("order:2", &c, 10), "as new: applied, the name parts kept");
        assert!(print.matches(&Listed::of(&c.email, "Maria da Silva")));
        assert_eq!(print.key, "order:2");
    }

    #[test]
    fn without_a_name_any_name_is_fine_but_not_any_email() {
        let mut print = ContactPrint::default();
        let mut c = elo_events::sample::order_placed(1).customer.unwrap();
        (c.firstname, c.lastname) = (None, Some("  ".into()));
        print.apply("order:1", &c, 10);
        assert!(print.matches(&Listed::of(&c.email, "Set By Marketing")));
        assert!(print.matches(&Listed::of(&c.email, "")));
        assert!(!print.matches(&Listed::of("x@example.com", "")));
    }
}
