//! Maps of expiring entries (cached readings, invalidation marks) bounded by sweeping.
//!
//! A sweep walks the whole map under its lock. Sweeping whenever the map holds `floor` entries
//! would walk it on every insert once that many entries are live (a backfill reading 50,000
//! customers within a consent TTL): quadratic work under a lock every webhook needs. So the next
//! sweep waits until the map holds twice what the last one left (at least `floor`): walks stay
//! amortised O(1) per insert, and the map holds at most twice its live entries as of the last
//! sweep (expired ones included). A `HashMap` keeps its capacity after a sweep. The map knows
//! its entries' expiry and sweeps inside `insert`, the only way in: no caller can skip the bound.
//!
//! Not `moka` or `quick_cache`: their per-entry expiry would do, but these maps are read and
//! written under locks held across several of them at once (a consent and its invalidation
//! marks: no stale read may slip in between), and entries are changed in place under the lock
//! (a reading queued for refresh), which a concurrent cache's API does not offer.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::ops::Deref;
use std::time::{Duration, Instant};

/// A `HashMap` of entries that expire `ttl` after their stamp. Read through `Deref`; written
/// only through its own methods, so no insert can skip the sweep.
#[derive(Debug)]
pub struct SweptMap<K, V> {
    map: HashMap<K, V>,
    floor: usize,
    sweep_at: usize,
    sweeps: u64,
    ttl: Duration,
    /// When an entry was stamped: it expires `ttl` later.
    stamp: fn(&V) -> Instant,
}

impl<K: Hash + Eq, V> SweptMap<K, V> {
    /// An empty map of entries expiring `ttl` after `stamp`, first swept at `floor` entries.
    pub fn new(floor: usize, ttl: Duration, stamp: fn(&V) -> Instant) -> Self {
        let floor = floor.max(1);
        Self { map: HashMap::new(), floor, sweep_at: floor, sweeps: 0, ttl, stamp }
    }

    /// Inserts after sweeping the expired entries out when the map has reached its threshold.
    pub fn insert(&mut self, key: K, value: V) -> Option<V> {
        self.sweep();
        self.map.insert(key, value)
    }

    pub fn get_mut<Q: Hash + Eq + ?Sized>(&mut self, key: &Q) -> Option<&mut V>
    where
        K: Borrow<Q>,
    {
        self.map.get_mut(key)
    }

    pub fn remove<Q: Hash + Eq + ?Sized>(&mut self, key: &Q) -> Option<V>
    where
        K: Borrow<Q>,
    {
        self.map.remove(key)
    }

    /// When the map has reached its threshold, drops the expired entries and sets the next
    /// threshold to twice what is left (at least `floor`). The clock is read only then, once.
    fn sweep(&mut self) {
        if self.map.len() < self.sweep_at {
            return;
        }
        let (now, ttl, stamp) = (Instant::now(), self.ttl, self.stamp);
        self.map.retain(|_, v| now.saturating_duration_since(stamp(v)) < ttl);
        self.sweep_at = self.map.len().saturating_mul(2).max(self.floor);
        self.sweeps += 1;
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

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(60);

    /// Entries stamped with their value: `live()` now, `expired()` two TTLs ago.
    fn map(floor: usize) -> SweptMap<u32, Instant> {
        SweptMap::new(floor, TTL, |at| *at)
    }

    fn live() -> Instant {
        Instant::now()
    }

    fn expired() -> Instant {
        Instant::now().checked_sub(2 * TTL).expect("the clock started over two minutes ago")
    }

    #[test]
    fn live_entries_past_the_floor_are_walked_once_per_doubling_not_per_insert() {
        let mut map = map(100);
        // Everything live: nothing can go.
        for i in 0..1_000 {
            map.insert(i, live());
        }
        assert_eq!(map.len(), 1_000);
        // Walks at 100, 200, 400, 800: four, not the 900 a fixed threshold takes.
        assert_eq!(map.sweeps(), 4);
    }

    #[test]
    fn expired_entries_go_and_the_threshold_falls_back_to_the_floor() {
        let mut map = map(10);
        for i in 0..10 {
            map.insert(i, if i < 3 { live() } else { expired() });
        }
        assert_eq!(map.sweeps(), 0, "under the floor: no walk");
        // The insert at the floor walks first: the seven expired entries go.
        map.insert(10, live());
        assert_eq!((map.sweeps(), map.len()), (1, 4));
        // Four left: the next walk comes at the floor again, not at eight.
        for i in 11..17 {
            map.insert(i, expired());
        }
        assert_eq!((map.sweeps(), map.len()), (1, 10));
        map.insert(17, live());
        assert_eq!(map.sweeps(), 2, "back at the floor (10)");
        assert_eq!(map.len(), 5, "the four live entries and the one just inserted: {:?}", map.keys());
    }
}
