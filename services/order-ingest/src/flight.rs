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
