//! What a `RESEND` needs from the sink's state: a one-shot "write the confirmed version
//! again" mark. The confirmed version itself is kept: it is the sink's only guard against
//! an older version (a late duplicate, a DLQ replay) overwriting a newer one, and for a
//! customer it is also the erasure floor, which nothing may lower.

use super::Sink;

/// Marks kept before the set is cleared (a lost mark costs one more repair round, no data).
const REWRITE_CAP: usize = 10_000;

impl Sink {
    /// Marks `key` (`order:<id>` or `customer:<customer key>`) so the next version of it
    /// equal to the confirmed one is written again instead of skipped as already applied;
    /// older versions stay skipped. Returns whether the sink had confirmed the key.
    pub fn forget(&self, key: &str) -> bool {
        let known = self.confirmed.lock().expect("confirmed lock").contains_key(key);
        let mut rewrite = self.rewrite.lock().expect("rewrite lock");
        if rewrite.len() >= REWRITE_CAP {
            rewrite.clear();
        }
        rewrite.insert(key.to_owned());
        known
    }

    /// The key was written: its rewrite mark is spent.
    pub(super) fn rewritten(&self, key: &str) {
        self.rewrite.lock().expect("rewrite lock").remove(key);
    }
}
