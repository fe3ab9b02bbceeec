//! A sweep's API budget: the account's rate, of which each replica spends the share its
//! partitions are of the whole (see the module docs of [`super`]), and a cap per round.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use governor::{DefaultDirectRateLimiter, Quota, RateLimiter};

use super::Progress;
use crate::metrics;
use crate::store::now_ms;

/// A sweep's API budget: the account's rate (this replica's share of it) and a cap per round.
pub(super) struct Budget {
    pub(super) name: &'static str,
    limiter: DefaultDirectRateLimiter,
    /// The limiter's burst: a tenth of a minute's calls (so replicas starting together do not
    /// each spend a whole minute's budget at once).
    burst: u32,
    per_round: u64,
    pub(super) progress: Arc<Progress>,
    /// (partitions held here now, partitions in all), set by each round; the count is read
    /// at every call, so a rebalance mid-round changes the cost at once.
    share: std::sync::Mutex<(Held, u32)>,
}

/// How many partitions this replica holds now (see [`crate::store::Ledger::held_count`]).
pub(super) type Held = Arc<dyn Fn() -> usize + Send + Sync>;

impl Budget {
    pub(super) fn new(name: &'static str, per_minute: NonZeroU32, per_round: u64) -> Self {
        let burst = NonZeroU32::new(per_minute.get() / 10).unwrap_or(NonZeroU32::MIN);
        Self {
            name,
            limiter: RateLimiter::direct(Quota::per_minute(per_minute).allow_burst(burst)),
            burst: burst.get(),
            per_round,
            progress: Arc::default(),
            share: std::sync::Mutex::new((Arc::new(|| 1), 1)),
        }
    }

    /// Sets this replica's share of the account's rate: `held()` (read at every call) of
    /// `total` partitions. Returns false when it holds none now (nothing of its own to judge:
    /// no round).
    pub(super) fn set_share(&self, held: Held, total: i32) -> bool {
        let now = held();
        *self.share.lock().expect("share") = (held, u32::try_from(total).unwrap_or(1).max(1));
        now > 0
    }

    /// What one call costs in limiter cells now: `total / held`, rounded up (`None`: this
    /// replica holds nothing now).
    pub(super) fn cost(&self) -> Option<u32> {
        let (held, total) = {
            let share = self.share.lock().expect("share");
            (share.0.clone(), share.1)
        };
        let held = u32::try_from(held()).unwrap_or(u32::MAX);
        (held > 0).then(|| total.max(held).div_ceil(held).max(1))
    }

    /// Waits for the rate limiter and counts the call; `false` when the round's cap is spent.
    pub(super) async fn spend(&self, spent_this_round: &mut u64) -> bool {
        if *spent_this_round >= self.per_round {
            return false;
        }
        // Priced when it is made: a rebalance since the round began changes the share.
        let Some(mut cost) = self.cost() else { return false }; // released everything
        while cost > 0 {
            let n = cost.min(self.burst);
            // Cannot fail: `n` is at most the burst.
            let _ = self.limiter.until_n_ready(NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN)).await;
            cost -= n;
        }
        *spent_this_round += 1;
        self.progress.calls.fetch_add(1, Ordering::Relaxed);
        metrics::SWEEP_CALLS.with_label_values(&[self.name]).inc();
        true
    }

    pub(super) fn checked(&self, n: u64) {
        self.progress.checked.fetch_add(n, Ordering::Relaxed);
        metrics::SWEEP_CHECKED.with_label_values(&[self.name]).inc_by(n);
    }

    pub(super) fn round(&self, result: &'static str) {
        self.progress.rounds.fetch_add(1, Ordering::Relaxed);
        metrics::SWEEP_ROUNDS.with_label_values(&[self.name, result]).inc();
        if result == "complete" {
            metrics::SWEEP_LAST.with_label_values(&[self.name]).set(now_ms() / 1000);
        }
    }
}

/// Why a sweep round stopped before covering its scope: the round is `partial` (it resumes
/// next round, nothing is wrong) or `failed` (an API refused or broke: `EloSweepFailing`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Cut {
    /// The round's call budget ran out (or an answer was cut short by it).
    Budget,
    /// A call failed.
    Failed,
}

impl Cut {
    /// The `result` label of `reconciler_sweep_rounds_total`.
    pub(super) fn result(self) -> &'static str {
        match self {
            Self::Budget => "partial",
            Self::Failed => "failed",
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(start_paused = true)]
    async fn the_budget_caps_a_round_and_counts_every_call() {
        let budget = Budget::new("test", NonZeroU32::new(600).unwrap(), 3);
        let mut spent = 0;
        for _ in 0..3 {
            assert!(budget.spend(&mut spent).await);
        }
        assert!(!budget.spend(&mut spent).await, "the round's cap");
        assert_eq!(budget.progress.calls.load(Ordering::Relaxed), 3);
    }

    fn fixed(n: usize) -> Held {
        Arc::new(move || n)
    }

    #[test]
    fn replicas_share_the_accounts_rate_by_the_partitions_they_hold() {
        let budget = Budget::new("test", NonZeroU32::new(60).unwrap(), 100);
        assert!(!budget.set_share(fixed(0), 3), "holding nothing: no round");
        let cost = |held, total| {
            budget.set_share(fixed(held), total);
            budget.cost().unwrap()
        };
        assert_eq!(cost(3, 3), 1, "one replica: the whole rate");
        // Three partitions on two replicas: 1/2 + 1/3 of the rate, within it.
        assert_eq!((cost(2, 3), cost(1, 3)), (2, 3));
        for (replicas, partitions) in [(2usize, 3i32), (3, 3), (4, 12), (5, 12), (7, 12)] {
            let held: Vec<usize> = (0..replicas).map(|r| (partitions as usize + replicas - 1 - r) / replicas).collect();
            assert_eq!(held.iter().sum::<usize>(), partitions as usize);
            let rate: f64 = held.iter().map(|h| 1.0 / f64::from(cost(*h, partitions))).sum();
            assert!(rate <= 1.0 + 1e-9, "{replicas} replicas on {partitions} partitions spend {rate} of the rate");
        }
    }

    #[tokio::test]
    async fn a_call_costs_the_replicas_share_of_the_rate() {
        // 600 a minute, burst 60: one replica of three (cost 3) gets 20 calls from the burst.
        let budget = Budget::new("test", NonZeroU32::new(600).unwrap(), 1_000);
        budget.set_share(fixed(1), 3);
        let started = std::time::Instant::now();
        let mut spent = 0;
        for _ in 0..20 {
            assert!(budget.spend(&mut spent).await);
        }
        assert!(budget.spend(&mut spent).await);
        assert!(
            started.elapsed() >= Duration::from_millis(250),
            "then 3 cells at 10 a second: {:?}",
            started.elapsed()
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_rebalance_mid_round_reprices_the_next_call() {
        use std::sync::atomic::AtomicUsize;
        let budget = Budget::new("test", NonZeroU32::new(60).unwrap(), 100);
        let held = Arc::new(AtomicUsize::new(3));
        let live = held.clone();
        assert!(budget.set_share(Arc::new(move || live.load(Ordering::Relaxed)), 3));
        assert_eq!(budget.cost(), Some(1), "all three partitions: the whole rate");
        let mut spent = 0;
        assert!(budget.spend(&mut spent).await);
        held.store(1, Ordering::Relaxed); // two replicas joined: one partition left here
        assert_eq!(budget.cost(), Some(3), "a third of the rate from the next call on");
        held.store(0, Ordering::Relaxed);
        assert_eq!(budget.cost(), None);
        assert!(!budget.spend(&mut spent).await, "holding nothing: no more calls");
        assert_eq!(spent, 1);
    }
}
