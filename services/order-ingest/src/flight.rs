//! Single-flight: concurrent lookups of one key wait for the first instead of all asking
//! Magento (a burst of orders for one hot SKU, or one returning customer, costs one call).
//!
//! A per-key async gate rather than a shared future: the work (check the cache, fetch, store)
//! runs under the gate, so whoever waited finds the result where the cache keeps it, and no
//! `'static` future or result cloning is needed. Gates are dropped once nobody holds them.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Arc, Mutex};

/// Per-key gates.
#[derive(Debug)]
pub struct Flights<K>(Mutex<HashMap<K, Arc<tokio::sync::Mutex<()>>>>);

impl<K> Default for Flights<K> {
    fn default() -> Self {
        Self(Mutex::new(HashMap::new()))
    }
}

impl<K: Hash + Eq + Clone> Flights<K> {
    /// Runs `work` with `key`'s gate held: one at a time per key, any number across keys.
    pub async fn run<T>(&self, key: &K, work: impl Future<Output = T>) -> T {
        let gate = self.0.lock().expect("flights lock").entry(key.clone()).or_default().clone();
        let result = {
            let _held = gate.lock().await;
            work.await
        };
        let mut gates = self.0.lock().expect("flights lock");
        // The map's reference and ours: nobody else waits, the gate can go.
        if Arc::strong_count(&gate) == 2 {
            gates.remove(key);
        }
        result
    }

    /// Gates currently held or awaited (bounded by concurrent work, not by keys ever seen).
    pub fn len(&self) -> usize {
        self.0.lock().expect("flights lock").len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn one_call_per_key_at_a_time_and_gates_do_not_pile_up() {
        let flights = Flights::default();
        let (cache, calls) = (Mutex::new(None::<u32>), AtomicUsize::new(0));
        let lookup = || {
            flights.run(&"sku", async {
                if let Some(hit) = *cache.lock().unwrap() {
                    return hit;
                }
                calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(20)).await;
                *cache.lock().unwrap() = Some(7);
                7
            })
        };
        let answers = futures::future::join_all((0..50).map(|_| lookup())).await;
        assert!(answers.iter().all(|a| *a == 7));
        assert_eq!(calls.load(Ordering::SeqCst), 1, "fifty lookups, one call");
        assert!(flights.is_empty(), "no gate left behind");
    }
}

/// When a cache entry stored `now` counts as stored, for its expiry: up to a quarter of the TTL
/// earlier, by key. Entries filled together (after a restart, a burst, a priming pass) then
/// expire over a spread instead of at one instant, when every one of them would miss at once
/// and queue behind the Magento concurrency limits (a latency cliff seen in `make bench`). The
/// spread is a hash of the key, not random, so it is the same on every run and testable.
pub fn staggered<K: Hash + ?Sized>(now: std::time::Instant, ttl: std::time::Duration, key: &K) -> std::time::Instant {
    use std::hash::Hasher;
    let spread = (ttl / 4).as_nanos() as u64;
    if spread == 0 {
        return now;
    }
    // SipHash with fixed keys: stable across runs and processes.
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut hasher);
    now.checked_sub(std::time::Duration::from_nanos(hasher.finish() % spread)).unwrap_or(now)
}

#[cfg(test)]
mod stagger_tests {
    use std::time::{Duration, Instant};

    use super::staggered;

    #[test]
    fn entries_stored_together_expire_spread_over_a_quarter_of_the_ttl() {
        let (now, ttl) = (Instant::now() + Duration::from_secs(3600), Duration::from_secs(40));
        let mut buckets = [0usize; 10];
        for sku in 0..1_000 {
            let at = staggered(now, ttl, &format!("SKU-{sku}"));
            let early = now - at;
            assert!(early < ttl / 4, "never more than a quarter of the TTL early: {early:?}");
            buckets[(early.as_secs_f64() / (ttl / 4).as_secs_f64() * 10.0) as usize] += 1;
        }
        // Uniform-ish: every tenth of the spread holds some entries (all zero without a stagger).
        assert!(buckets.iter().all(|&n| n > 50), "spread: {buckets:?}");
        assert_eq!(staggered(now, ttl, "SKU-1"), staggered(now, ttl, "SKU-1"), "stable per key");
        assert_eq!(staggered(now, Duration::ZERO, "SKU-1"), now);
    }
}
