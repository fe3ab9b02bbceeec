//! Retry timing shared by the consumer runtime's record retries and DLQ writes.

use std::time::Duration;

/// Retry timing and the transient budget.
#[derive(Clone, Debug)]
pub struct RetryPolicy {
    /// First backoff.
    pub initial: Duration,
    /// Backoff cap.
    pub max: Duration,
    /// Transient failures of one record before it is parked in the DLQ. Only transient
    /// failures count: waits for a rate window or for credentials never use this budget.
    pub transient_attempts: u32,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self { initial: Duration::from_millis(200), max: Duration::from_secs(30), transient_attempts: 8 }
    }
}

impl RetryPolicy {
    /// Exponential backoff with jitter: uniform in [base/2, base], base doubling per attempt up
    /// to `max`.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let base = self.initial.saturating_mul(1u32 << attempt.min(16)).min(self.max);
        let half = base / 2;
        half + half.mul_f64(rand::random::<f64>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_caps() {
        let policy =
            RetryPolicy { initial: Duration::from_millis(100), max: Duration::from_secs(2), transient_attempts: 3 };
        for attempt in 0..20 {
            let d = policy.backoff(attempt);
            let base = Duration::from_millis(100).saturating_mul(1 << attempt.min(16)).min(Duration::from_secs(2));
            assert!(d >= base / 2 && d <= base, "attempt {attempt}: {d:?} not in [{:?}, {base:?}]", base / 2);
        }
    }
}
