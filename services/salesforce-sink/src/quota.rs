//! Quota governance: the org's rolling 24-hour API quota is shared with every other
//! integration, so the sink keeps a reserve for them, refuses its own calls locally once only
//! the reserve is left (the runtime waits, parks nothing), lets one call through per pause to
//! learn whether budget returned (usage is only known from `Sforce-Limit-Info`), and forecasts
//! the hours of quota left from its recent usage rate, warning before exhaustion.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::metrics;

/// The quota governor of one client.
pub struct Governor {
    /// Share of the daily limit left for other integrations (0..100).
    reserve_percent: u64,
    /// Warn when fewer hours than this are left at the current rate.
    warn_hours: f64,
    /// How often a call may probe while the sink holds back.
    probe_every: Duration,
    state: Mutex<State>,
    warned: AtomicBool,
}

#[derive(Default)]
struct State {
    used: u64,
    limit: u64,
    /// (when, used) samples of the last hour, for the rate.
    samples: VecDeque<(Instant, u64)>,
    last_probe: Option<Instant>,
}

impl Governor {
    pub fn new(reserve_percent: u64, warn_hours: f64, probe_every: Duration) -> Self {
        Self {
            reserve_percent: reserve_percent.min(100),
            warn_hours,
            probe_every,
            state: Mutex::default(),
            warned: AtomicBool::new(false),
        }
    }

    fn reserve(&self, limit: u64) -> u64 {
        limit * self.reserve_percent / 100
    }

    /// Whether the sink may spend a call now: `false` while only the reserve is left, except
    /// one probe per `probe_every`.
    pub fn admit(&self) -> bool {
        let mut s = self.state.lock().expect("quota lock");
        if s.limit == 0 || s.used + self.reserve(s.limit) < s.limit {
            return true;
        }
        let now = Instant::now();
        if s.last_probe.is_none_or(|t| now.duration_since(t) >= self.probe_every) {
            s.last_probe = Some(now);
            return true;
        }
        false
    }

    /// Records a `Sforce-Limit-Info` reading and updates the forecast.
    pub fn observe(&self, used: u64, limit: u64) {
        let now = Instant::now();
        let mut s = self.state.lock().expect("quota lock");
        s.used = used;
        s.limit = limit;
        s.samples.push_back((now, used));
        while s.samples.len() > 2
            && s.samples.front().is_some_and(|(t, _)| now.duration_since(*t) > Duration::from_secs(3600))
        {
            s.samples.pop_front();
        }
        if s.samples.len() > 10_000 {
            s.samples.pop_front();
        }
        let budget = limit.saturating_sub(self.reserve(limit)).saturating_sub(used) as f64;
        metrics::QUOTA_BUDGET.set(budget as i64);
        let hours = match (s.samples.front(), s.samples.back()) {
            (Some((t0, u0)), Some((t1, u1))) if *t1 > *t0 && u1 > u0 => {
                let per_hour = (u1 - u0) as f64 / t1.duration_since(*t0).as_secs_f64() * 3600.0;
                budget / per_hour
            }
            _ => f64::INFINITY,
        };
        metrics::QUOTA_HOURS_LEFT.set(if hours.is_finite() { hours } else { 24.0 * 365.0 });
        if hours < self.warn_hours {
            if !self.warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    hours_left = hours,
                    used,
                    limit,
                    reserve_percent = self.reserve_percent,
                    "salesforce API quota will run out at the current rate"
                );
            }
        } else {
            self.warned.store(false, Ordering::Relaxed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_back_the_reserve_and_probes_once_per_pause() {
        let g = Governor::new(10, 4.0, Duration::from_secs(3600));
        assert!(g.admit(), "nothing known yet");
        g.observe(800, 1000);
        assert!(g.admit());
        g.observe(900, 1000);
        assert!(g.admit(), "the first probe goes through");
        assert!(!g.admit(), "then the sink holds back");
        g.observe(100, 1000);
        assert!(g.admit(), "budget returned");
    }

    #[test]
    fn forecasts_hours_left_from_the_recent_rate() {
        let g = Governor::new(0, 4.0, Duration::from_secs(1));
        g.observe(0, 1_000_000);
        std::thread::sleep(Duration::from_millis(50));
        g.observe(100, 1_000_000);
        let hours = metrics::QUOTA_HOURS_LEFT.get();
        assert!(hours > 0.0 && hours < 1.0, "100 calls in 50 ms leave well under an hour: {hours}");
    }
}
