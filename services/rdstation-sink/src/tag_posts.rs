//! RD's account-wide limit on tag posts (`POST …/tag`: 15,000 per account per day, saas-apis.md
//! §3 and §7), shared out among the partitions of the input topic and kept in each partition's
//! state store, so a restart or a rebalance does not forget the day's count.
//!
//! Why a share per partition: a partition's contacts are written by whichever replica owns it,
//! and replicas do not talk to each other. Each partition may spend `per_day / partitions`
//! (rounded down) in any 24 hours, so however the partitions are spread, the account never
//! receives more than `per_day`. The ledger travels with the partition's changelog.
//!
//! Past its share a partition still adds tags, the other way RD allows: read the contact's
//! tags and PATCH the whole list back (two contact requests, governed by the per-minute budget,
//! instead of one tag post).
//!
//! The count is kept in hour buckets (a day's ledger is at most 25 small entries); a bucket
//! counts until the whole hour has left the window, so the count is never below RD's.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

const HOUR_MS: i64 = 3_600_000;

/// The tag posts a partition sent, by the hour they were sent in.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TagPostLedger {
    /// Hour number (ms since the epoch / 1 h) → tag posts sent in that hour.
    pub hours: BTreeMap<i64, u32>,
}

impl TagPostLedger {
    /// Tag posts counted against the window ending at `now_ms` (whole hours: rounded up).
    pub fn used(&self, window_ms: i64, now_ms: i64) -> u32 {
        let first = first_counted_hour(window_ms, now_ms);
        self.hours.range(first..).map(|(_, n)| *n).sum()
    }

    /// Tag posts left in the window ending at `now_ms`.
    pub fn left(&self, share: u32, window_ms: i64, now_ms: i64) -> u32 {
        share.saturating_sub(self.used(window_ms, now_ms))
    }

    /// Counts one tag post at `now_ms` if the share has room; drops hours out of the window.
    /// Returns the hour it was counted in (for [`TagPostLedger::give_back`]).
    pub fn take(&mut self, share: u32, window_ms: i64, now_ms: i64) -> Option<i64> {
        let first = first_counted_hour(window_ms, now_ms);
        self.hours = self.hours.split_off(&first);
        if self.used(window_ms, now_ms) >= share {
            return None;
        }
        let hour = now_ms.div_euclid(HOUR_MS);
        *self.hours.entry(hour).or_default() += 1;
        Some(hour)
    }

    /// Gives back a post counted in `hour` and never sent.
    pub fn give_back(&mut self, hour: i64) {
        if let Some(n) = self.hours.get_mut(&hour) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                self.hours.remove(&hour);
            }
        }
    }
}

/// The first hour bucket that still has a moment inside the window ending at `now_ms`.
fn first_counted_hour(window_ms: i64, now_ms: i64) -> i64 {
    (now_ms - window_ms).div_euclid(HOUR_MS)
}

/// A partition's share of the account's daily tag posts (never more than the account allows,
/// summed over the partitions).
pub fn share(per_day: u32, partitions: i32) -> u32 {
    per_day / u32::try_from(partitions.max(1)).unwrap_or(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DAY_MS: i64 = 24 * HOUR_MS;

    #[test]
    fn a_partition_spends_its_share_then_gets_it_back_as_hours_leave_the_day() {
        let mut ledger = TagPostLedger::default();
        let start = 1_000 * DAY_MS + 10 * 60_000; // 00:10
        assert!(ledger.take(3, DAY_MS, start).is_some());
        assert!(ledger.take(3, DAY_MS, start + HOUR_MS).is_some()); // 01:10
        assert!(ledger.take(3, DAY_MS, start + HOUR_MS + 1).is_some());
        assert!(ledger.take(3, DAY_MS, start + 2 * HOUR_MS).is_none(), "the share is spent");
        assert_eq!(ledger.left(3, DAY_MS, start + 2 * HOUR_MS), 0);
        // 24 h after 00:10 the 00:xx hour still overlaps the window (00:10-00:59 of the day
        // before is not all out): counted, so the ledger never says less than RD counts.
        assert!(ledger.take(3, DAY_MS, start + DAY_MS).is_none());
        // Once the whole 00:xx hour has left the window, its post is free again.
        assert_eq!(ledger.left(3, DAY_MS, 1_001 * DAY_MS + HOUR_MS), 1);
        assert!(ledger.take(3, DAY_MS, 1_001 * DAY_MS + HOUR_MS).is_some());
        assert!(ledger.take(3, DAY_MS, 1_001 * DAY_MS + HOUR_MS).is_none());
        // Old hours are dropped: the ledger stays a day's worth of buckets.
        assert!(ledger.hours.len() <= 25, "{:?}", ledger.hours);
        assert!(!ledger.hours.contains_key(&(start / HOUR_MS)));
    }

    #[test]
    fn a_post_given_back_is_free_again_and_leaves_the_other_hours_alone() {
        let mut ledger = TagPostLedger::default();
        let before_the_hour = 5 * DAY_MS + HOUR_MS - 1;
        let first = ledger.take(2, DAY_MS, before_the_hour).unwrap();
        let second = ledger.take(2, DAY_MS, before_the_hour + 2).unwrap();
        assert_ne!(first, second);
        assert!(ledger.take(2, DAY_MS, before_the_hour + 3).is_none());
        // The first post (10:59:59) never left; the second (11:00:01) did.
        ledger.give_back(first);
        assert_eq!(ledger.left(2, DAY_MS, before_the_hour + 4), 1);
        assert_eq!(ledger.hours.get(&second), Some(&1), "the hour of the post sent keeps it");
        ledger.give_back(first);
        assert_eq!(ledger.hours.len(), 1, "nothing more to give back in that hour");
    }

    #[test]
    fn the_shares_of_all_partitions_never_add_up_to_more_than_the_account_allows() {
        for partitions in 1..=64 {
            for per_day in [0, 1, 7, 15_000] {
                assert!(share(per_day, partitions) * partitions as u32 <= per_day);
            }
        }
        assert_eq!(share(15_000, 12), 1_250);
        assert_eq!(share(15_000, 0), 15_000, "a topic reported without partitions counts as one");
    }

    #[test]
    fn the_ledger_survives_the_changelog() {
        let mut ledger = TagPostLedger::default();
        assert!(ledger.take(5, DAY_MS, 42 * DAY_MS).is_some());
        let back: TagPostLedger = serde_json::from_slice(&serde_json::to_vec(&ledger).unwrap()).unwrap();
        assert_eq!(back, ledger);
        assert_eq!(back.used(DAY_MS, 42 * DAY_MS + 1), 1);
    }
}
