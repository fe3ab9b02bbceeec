//! Where one store's poll stands, as kept in the compacted checkpoint topic.
//!
//! Positions are keyset pairs (`updated_at`, id): strictly increasing whatever the number of
//! entities sharing one second, so every page read moves one forward. The versions published
//! inside the overlap window are remembered as 64-bit version keys (from the event id, which
//! names the content), packed per second so a window of tens of thousands stays a small record.

use std::collections::{BTreeMap, BTreeSet};

use base64::Engine;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// A keyset position: entities strictly after it in (`updated_at`, id) order come next.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Keyset {
    /// `updated_at` (ms, UTC; Magento's resolution is one second).
    pub updated_at_ms: i64,
    /// `entity_id` (orders) or `id` (customers); 0 means "every entity of that second".
    pub id: i64,
}

impl Keyset {
    pub fn new(updated_at_ms: i64, id: i64) -> Self {
        Self { updated_at_ms, id }
    }
}

/// Versions remembered at most; past it the oldest seconds are forgotten and the overlap
/// re-read starts after them (a narrower overlap, never a flood of duplicates). 50,000 keys
/// pack into about 550 kB, under Kafka's default 1 MB record limit.
pub const MAX_SEEN: usize = 50_000;

/// Where one store's poll stands.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Greatest `updated_at` read (ms, UTC): with `cursor_id`, the head new versions follow.
    pub cursor_ms: i64,
    /// Id of the last entity read at `cursor_ms` (absent in checkpoints written before keyset
    /// paging: 0 re-reads that second, which the version keys make harmless).
    #[serde(default)]
    pub cursor_id: i64,
    /// Where an unfinished re-read of the overlap window stands; `None` starts a new one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recheck: Option<Keyset>,
    /// The overlap re-read never starts before this (raised when versions had to be forgotten).
    #[serde(default)]
    pub recheck_floor_ms: i64,
    /// (updated_at, version key) published or dead-lettered inside the overlap window.
    #[serde(default, with = "packed")]
    pub seen: BTreeSet<(i64, u64)>,
}

impl Checkpoint {
    /// A poll that has never run starts here (everything at or after `from_ms`).
    pub fn starting_at(from_ms: i64) -> Self {
        Self { cursor_ms: from_ms, ..Self::default() }
    }

    /// The head: new versions are strictly after it.
    pub fn head(&self) -> Keyset {
        Keyset::new(self.cursor_ms, self.cursor_id)
    }

    /// Moves the head forward to `key` (never back).
    pub fn advance(&mut self, key: Keyset) {
        if key > self.head() {
            (self.cursor_ms, self.cursor_id) = (key.updated_at_ms, key.id);
        }
    }

    /// Forgets what the overlap can no longer meet and keeps the record bounded.
    pub fn prune(&mut self, overlap_ms: i64) {
        let horizon = self.cursor_ms - overlap_ms;
        self.seen.retain(|(ts, _)| *ts >= horizon);
        while self.seen.len() > MAX_SEEN {
            let Some(&(oldest, _)) = self.seen.first() else { break };
            self.seen.retain(|(ts, _)| *ts > oldest);
            // Re-reading that second would republish what was forgotten: the overlap narrows.
            self.recheck_floor_ms = self.recheck_floor_ms.max(oldest + 1);
            tracing::warn!(
                forgotten_second = oldest,
                "more versions inside the poll overlap than a checkpoint holds; the overlap narrows"
            );
        }
    }
}

/// `seen` as `{"<updated_at ms>": "<base64 of the big-endian u64 keys>"}`: 11 bytes a key.
mod packed {
    use super::*;

    pub(super) fn serialize<S: Serializer>(seen: &BTreeSet<(i64, u64)>, s: S) -> Result<S::Ok, S::Error> {
        let mut by_second: BTreeMap<i64, Vec<u8>> = BTreeMap::new();
        for (ts, key) in seen {
            by_second.entry(*ts).or_default().extend_from_slice(&key.to_be_bytes());
        }
        let encoded: BTreeMap<String, String> = by_second
            .into_iter()
            .map(|(ts, bytes)| (ts.to_string(), base64::engine::general_purpose::STANDARD.encode(bytes)))
            .collect();
        encoded.serialize(s)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<BTreeSet<(i64, u64)>, D::Error> {
        use serde::de::Error;
        let encoded = BTreeMap::<String, String>::deserialize(d)?;
        let mut seen = BTreeSet::new();
        for (ts, keys) in encoded {
            let ts: i64 = ts.parse().map_err(|_| D::Error::custom(format!("seen: {ts:?} is not a timestamp")))?;
            let bytes = base64::engine::general_purpose::STANDARD.decode(keys).map_err(D::Error::custom)?;
            if bytes.len() % 8 != 0 {
                return Err(D::Error::custom("seen: keys are 8 bytes each"));
            }
            seen.extend(bytes.chunks_exact(8).map(|c| (ts, u64::from_be_bytes(c.try_into().expect("8 bytes")))));
        }
        Ok(seen)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoints_round_trip_compactly_and_old_ones_still_load() {
        let mut checkpoint = Checkpoint::starting_at(1_000);
        checkpoint.advance(Keyset::new(5_000, 9));
        checkpoint.recheck = Some(Keyset::new(2_000, 3));
        checkpoint.seen = (0..10_000u64).map(|k| (5_000, k.wrapping_mul(0x9e37_79b9_7f4a_7c15))).collect();
        let json = serde_json::to_vec(&checkpoint).unwrap();
        assert!(json.len() < 12 * 10_000, "about 11 bytes a key: {}", json.len());
        assert_eq!(serde_json::from_slice::<Checkpoint>(&json).unwrap(), checkpoint);
        let old: Checkpoint = serde_json::from_str(r#"{"cursor_ms":7,"recent":[[7,1]]}"#).unwrap();
        assert_eq!((old.head(), old.recheck, old.seen.len()), (Keyset::new(7, 0), None, 0));
    }

    #[test]
    fn the_head_only_moves_forward_and_pruning_bounds_the_record() {
        let mut checkpoint = Checkpoint::starting_at(10_000);
        checkpoint.advance(Keyset::new(10_000, 4));
        checkpoint.advance(Keyset::new(9_000, 99));
        assert_eq!(checkpoint.head(), Keyset::new(10_000, 4));
        checkpoint.seen = [(1_000, 1), (9_500, 2), (10_000, 3)].into_iter().collect();
        checkpoint.prune(1_000);
        assert_eq!(checkpoint.seen.len(), 2, "older than the overlap is forgotten");
        checkpoint.seen = (0..MAX_SEEN as u64 + 10).map(|k| (9_000 + (k % 2) as i64, k)).collect();
        checkpoint.prune(5_000);
        assert!(checkpoint.seen.len() <= MAX_SEEN);
        assert_eq!(checkpoint.recheck_floor_ms, 9_001, "the forgotten second is not re-read");
    }
}
