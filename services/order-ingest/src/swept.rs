//! Maps of expiring entries (cached readings, invalidation marks) bounded by sweeping.
//!
//! A sweep walks the whole map under its lock. Sweeping whenever the map holds `floor` entries
//! would walk it on every insert once that many entries are live (a backfill reading 50,000
//! customers within a consent TTL): quadratic work under a lock every webhook needs. So the next
//! sweep waits until the map holds twice what the last one left (at least `floor`): walks stay
//! amortised O(1) per insert, and the map holds at most twice its live entries as of the last
//! sweep (expired ones included). A `HashMap` keeps its capacity after a sweep.
//!
//! Not `moka` or `quick_cache`: their per-entry expiry would do, but these maps are read and
//! written under locks held across several of them at once (a consent and its invalidation
//! marks: no stale read may slip in between), and entries are changed in place under the lock
//! (a reading queued for refresh), which a concurrent cache's API does not offer.

use std::collections::HashMap;
use std::hash::Hash;
use std::ops::{Deref, DerefMut};

/// A `HashMap` (reached through `Deref`) that sweeps itself with [`SweptMap::sweep`].
#[derive(Debug)]
pub struct SweptMap<K, V> {
    map: HashMap<K, V>,
    floor: usize,
    sweep_at: usize,
    sweeps: u64,
}

impl<K: Hash + Eq, V> SweptMap<K, V> {
    /// An empty map first swept at `floor` entries.
    pub fn new(floor: usize) -> Self {
        let floor = floor.max(1);
        Self { map: HashMap::new(), floor, sweep_at: floor, sweeps: 0 }
    }

    /// Whether the map has reached its threshold: the next [`SweptMap::sweep`] walks it.
    pub fn due(&self) -> bool {
        self.map.len() >= self.sweep_at
    }

    /// When the map has reached its threshold, keeps only the entries `keep` accepts and sets
    /// the next threshold to twice what is left (at least `floor`). Returns whether it swept.
    pub fn sweep(&mut self, keep: impl FnMut(&K, &mut V) -> bool) -> bool {
        if !self.due() {
            return false;
        }
        self.map.retain(keep);
        self.sweep_at = self.map.len().saturating_mul(2).max(self.floor);
        self.sweeps += 1;
        true
    }

    /// Walks so far (tests and diagnostics).
    pub fn sweeps(&self) -> u64 {
        self.sweeps
    }
}

impl<K, V> Deref for SweptMap<K, V> {
    type Target = HashMap<K, V>;
    fn deref(&self) -> &Self::Target {
        &self.map
    }
}

impl<K, V> DerefMut for SweptMap<K, V> {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.map
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_entries_past_the_floor_are_walked_once_per_doubling_not_per_insert() {
        let mut map = SweptMap::new(100);
        // Everything live: nothing can go.
        for i in 0..1_000 {
            map.sweep(|_, _| true);
            map.insert(i, ());
        }
        assert_eq!(map.len(), 1_000);
        // Walks at 100, 200, 400, 800: four, not the 900 a fixed threshold takes.
        assert_eq!(map.sweeps(), 4);
    }

    #[test]
    fn expired_entries_go_and_the_threshold_falls_back_to_the_floor() {
        let mut map = SweptMap::new(10);
        for i in 0..10 {
            map.insert(i, i);
        }
        assert!(map.sweep(|k, _| *k < 3), "at the floor: swept");
        assert_eq!(map.len(), 3);
        // Three left: the next walk comes at the floor again, not at six.
        for i in 10..16 {
            map.insert(i, i);
            assert!(!map.sweep(|_, _| false));
        }
        map.insert(16, 16);
        assert!(map.sweep(|_, _| false), "back at the floor (10)");
        assert!(map.is_empty());
    }
}
