//! Fault injection shared by the simulators: latency, error rates by status, outage windows.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Faults of one simulator.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FaultConfig {
    /// Added latency, uniform in [min, max] milliseconds.
    #[serde(default)]
    pub latency_ms: Option<(u64, u64)>,
    /// Added latency drawn from an exponential distribution with this mean (ms), the usual
    /// shape of service times with a long tail; added to `latency_ms` when both are set.
    #[serde(default)]
    pub latency_exp_mean_ms: Option<f64>,
    /// Probability (0..1) of failing a request with `error_status`.
    #[serde(default)]
    pub error_rate: f64,
    /// Status of injected errors (default 503).
    #[serde(default)]
    pub error_status: Option<u16>,
    /// Every request fails with 503 until this time (ms since the epoch).
    #[serde(default)]
    pub outage_until_ms: Option<i64>,
}

/// What to do with a request.
#[derive(Debug, PartialEq)]
pub enum FaultDecision {
    Proceed,
    Fail(u16),
}

/// Fault settings of every simulator (cheap to clone).
#[derive(Clone, Default)]
pub struct Faults {
    inner: Arc<Mutex<HashMap<String, FaultConfig>>>,
}

impl Faults {
    pub fn set(&self, simulator: &str, config: FaultConfig) {
        self.inner.lock().expect("faults lock").insert(simulator.to_owned(), config);
    }

    pub fn get(&self, simulator: &str) -> FaultConfig {
        self.inner.lock().expect("faults lock").get(simulator).cloned().unwrap_or_default()
    }

    /// Applies latency, then decides whether the request fails.
    pub async fn decide(&self, simulator: &str) -> FaultDecision {
        let config = self.get(simulator);
        if let Some((min, max)) = config.latency_ms {
            let ms = if max > min { min + rand::random::<u64>() % (max - min + 1) } else { min };
            tokio::time::sleep(Duration::from_millis(ms)).await;
        }
        if let Some(mean) = config.latency_exp_mean_ms.filter(|m| *m > 0.0) {
            let u: f64 = rand::random::<f64>().max(f64::MIN_POSITIVE);
            let ms = (-mean * u.ln()).min(mean * 20.0);
            tokio::time::sleep(Duration::from_secs_f64(ms / 1000.0)).await;
        }
        if config.outage_until_ms.is_some_and(|until| crate::now_ms() < until) {
            return FaultDecision::Fail(503);
        }
        if config.error_rate > 0.0 && rand::random::<f64>() < config.error_rate {
            return FaultDecision::Fail(config.error_status.unwrap_or(503));
        }
        FaultDecision::Proceed
    }
}
