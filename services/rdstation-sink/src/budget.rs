//! The per-account contact budget, counted the way RD sees it: at most `limit` contact
//! requests in any rolling `window` (RD: 120 per minute).
//!
//! A request holds a slot from the moment it is admitted until its answer is back, and the
//! slot keeps counting for one whole `window` after that. RD received the request somewhere
//! between those two instants, so a request admitted when a slot has expired reaches RD at
//! least `window` after the earlier one did, whatever the latency, queueing or token refresh
//! in between: RD never sees more than `limit` in a rolling window. (A limiter that only
//! spaces admissions, as the GCRA did before, lets a request admitted early and sent late
//! share RD's window with the next `limit` ones: 121 in 60 s.)
//!
//! A 429 from RD pauses the whole budget (every request of the account) for its
//! `Retry-After`, capped at one window (see [`AccountBudget::pause`]).

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// The budget, shared by every clone of the client.
pub struct AccountBudget {
    limit: usize,
    window: Duration,
    state: Mutex<State>,
    changed: Notify,
}

#[derive(Default)]
struct State {
    /// When each answered request stops counting (its answer + window).
    expiries: BinaryHeap<Reverse<Instant>>,
    /// Slots admitted and not given back yet (in flight, or reserved for a later request).
    held: usize,
    /// No request goes out before this (a 429).
    paused_until: Option<Instant>,
}

impl State {
    fn prune(&mut self, now: Instant) {
        while self.expiries.peek().is_some_and(|Reverse(t)| *t <= now) {
            self.expiries.pop();
        }
        if self.paused_until.is_some_and(|t| t <= now) {
            self.paused_until = None;
        }
    }
}

/// A request's place in the budget; given back when dropped. Marked [`Slot::sent`], it
/// keeps counting for a window after the drop (the request reached RD); unsent, it is simply
/// freed (a reservation nobody used).
pub struct Slot {
    budget: Arc<AccountBudget>,
    sent: bool,
}

impl Slot {
    /// The request is about to leave: it counts for a window after its answer.
    pub fn sent(&mut self) {
        self.sent = true;
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut state = self.budget.state.lock().expect("budget lock");
        state.held -= 1;
        if self.sent {
            state.expiries.push(Reverse(Instant::now() + self.budget.window));
        }
        drop(state);
        self.budget.changed.notify_waiters();
    }
}

impl AccountBudget {
    pub fn new(limit: usize, window: Duration) -> Arc<Self> {
        Arc::new(Self { limit: limit.max(1), window, state: Mutex::default(), changed: Notify::new() })
    }

    pub fn window(&self) -> Duration {
        self.window
    }

    /// A slot if one is free at this instant (and no 429 pause is running).
    pub fn try_acquire(self: &Arc<Self>) -> Option<Slot> {
        self.admit().ok()
    }

    /// Waits for a slot.
    pub async fn acquire(self: &Arc<Self>) -> Slot {
        loop {
            // Registered before the check, so a slot given back in between wakes us.
            let changed = self.changed.notified();
            match self.admit() {
                Ok(slot) => return slot,
                Err(Some(until)) => {
                    tokio::select! {
                        _ = tokio::time::sleep_until(until) => {}
                        _ = changed => {}
                    }
                }
                Err(None) => changed.await,
            }
        }
    }

    /// Whether a 429 pause runs.
    pub fn paused(&self) -> bool {
        let mut state = self.state.lock().expect("budget lock");
        state.prune(Instant::now());
        state.paused_until.is_some()
    }

    /// Waits while a 429 pause runs (for requests that take no slot: events).
    pub async fn unpaused(&self) {
        loop {
            let until = {
                let mut state = self.state.lock().expect("budget lock");
                state.prune(Instant::now());
                state.paused_until
            };
            match until {
                Some(until) => tokio::time::sleep_until(until).await,
                None => return,
            }
        }
    }

    /// RD answered 429: nothing goes out for `retry_after`, capped at one window. RD does not
    /// say which of its limits was hit; a per-contact one can ask for hours, which must not
    /// stop the account (that contact waits on its own, in its state), while one window is
    /// always enough for the account's.
    pub fn pause(&self, retry_after: Duration) {
        let until = Instant::now() + retry_after.min(self.window);
        let mut state = self.state.lock().expect("budget lock");
        state.paused_until = Some(state.paused_until.map_or(until, |t| t.max(until)));
    }

    /// Counts the whole budget as spent until `until`: at start-up, for the requests a
    /// previous process (crashed, killed, or replaced by a rollout) may have sent in its last
    /// window, which this one cannot see; without it a restart under a backlog lets RD see up
    /// to twice the budget in a minute.
    pub fn assume_spent_until(&self, until: Instant) {
        let mut state = self.state.lock().expect("budget lock");
        for _ in 0..self.limit {
            state.expiries.push(Reverse(until));
        }
    }

    /// `Err(Some(t))`: try again at `t`; `Err(None)`: when a slot is given back.
    fn admit(self: &Arc<Self>) -> Result<Slot, Option<Instant>> {
        let now = Instant::now();
        let mut state = self.state.lock().expect("budget lock");
        state.prune(now);
        if let Some(until) = state.paused_until {
            return Err(Some(until));
        }
        if state.expiries.len() + state.held < self.limit {
            state.held += 1;
            return Ok(Slot { budget: self.clone(), sent: false });
        }
        Err(state.expiries.peek().map(|Reverse(t)| *t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_slot_counts_from_admission_until_a_window_after_the_answer() {
        let budget = AccountBudget::new(2, Duration::from_secs(60));
        let mut a = budget.acquire().await;
        a.sent();
        let b = budget.acquire().await;
        assert!(budget.try_acquire().is_none(), "two held");
        // An unsent slot (a reservation nobody used) frees its place at once.
        drop(b);
        let mut c = budget.try_acquire().expect("b's place is free");
        c.sent();
        // `a` is answered 10 s after it was admitted: it counts until 70 s.
        tokio::time::advance(Duration::from_secs(10)).await;
        drop(a);
        drop(c);
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(budget.try_acquire().is_none(), "both answered requests count a window after their answer");
        let started = Instant::now();
        let _d = budget.acquire().await;
        assert_eq!(started.elapsed(), Duration::from_secs(1), "admitted when the first one stops counting");
    }

    #[tokio::test(start_paused = true)]
    async fn a_budget_assumed_spent_at_start_admits_nothing_until_then() {
        let budget = AccountBudget::new(3, Duration::from_secs(60));
        budget.assume_spent_until(Instant::now() + Duration::from_secs(60));
        assert!(budget.try_acquire().is_none(), "a previous process may have spent it");
        tokio::time::advance(Duration::from_secs(59)).await;
        assert!(budget.try_acquire().is_none());
        let started = Instant::now();
        let _first = budget.acquire().await;
        assert_eq!(started.elapsed(), Duration::from_secs(1), "admitted once the window has passed");
        let (_second, _third) = (budget.try_acquire().expect("room"), budget.try_acquire().expect("room"));
        assert!(budget.try_acquire().is_none(), "and the whole budget, no more");
    }

    #[tokio::test(start_paused = true)]
    async fn a_pause_holds_every_request_and_is_capped_at_one_window() {
        let budget = AccountBudget::new(100, Duration::from_secs(60));
        budget.pause(Duration::from_secs(3 * 3600));
        assert!(budget.try_acquire().is_none());
        let started = Instant::now();
        budget.unpaused().await;
        let _slot = budget.acquire().await;
        assert_eq!(started.elapsed(), Duration::from_secs(60));
    }
}
