//! Fault injection shared by the simulators: latency, error rates by status, outage windows,
//! per simulator and per endpoint, settable at run time through the control API.
//!
//! The simulators route every request through one fallback handler (their paths mirror the
//! vendors' and are matched in code), so there is no axum `MatchedPath` to key on. Endpoint
//! entries are therefore keyed by `"<METHOD> <template>"`, an axum-style route template that is
//! matched against the request path: `{name}` matches one segment, `{*name}` the rest of the
//! path. When several templates match, the one with the most literal segments wins; an
//! endpoint entry replaces the simulator-level settings for the requests it matches.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Faults of one simulator, or of one endpoint of it.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FaultConfig {
    /// Added latency, uniform in [min, max] milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<(u64, u64)>,
    /// Fixed added latency (ms), before jitter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_fixed_ms: Option<u64>,
    /// Uniform jitter in [0, jitter_ms] added to `latency_fixed_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jitter_ms: Option<u64>,
    /// Added latency drawn from an exponential distribution with this mean (ms), the usual
    /// shape of service times with a long tail; added to the other latencies when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_exp_mean_ms: Option<f64>,
    /// Probability (0..1) of failing a request with `error_status`.
    #[serde(default)]
    pub error_rate: f64,
    /// Status of injected errors (default 503).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_status: Option<u16>,
    /// Error rate by status (`{"429": 0.05, "500": 0.01}`), drawn after `error_rate`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub error_rates: BTreeMap<u16, f64>,
    /// The next this many requests fail with `error_status` (each one counts down, whatever
    /// the other settings draw): "the first upload answers 503 once" for a retry test.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub fail_next: u32,
    /// Requests let through (each one counts down) before `fail_next` starts counting: "the
    /// fifth upload answers 503".
    #[serde(default, skip_serializing_if = "is_zero")]
    pub pass_first: u32,
    /// Every request fails with 503 until this time (ms since the epoch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outage_until_ms: Option<i64>,
    /// Per-endpoint overrides, keyed `"<METHOD> <path template>"` (simulator level only).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub endpoints: BTreeMap<String, FaultConfig>,
}

impl FaultConfig {
    /// Checks rates and endpoint keys; the message says what is wrong.
    pub fn validate(&self, top_level: bool) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.error_rate) {
            return Err("error_rate must be between 0 and 1".into());
        }
        let by_status: f64 = self.error_rates.values().sum();
        if self.error_rates.values().any(|r| !(0.0..=1.0).contains(r)) || by_status > 1.0 {
            return Err("error_rates must be between 0 and 1 and add up to at most 1".into());
        }
        if let Some(status) =
            self.error_rates.keys().chain(self.error_status.iter()).find(|s| !(400..=599).contains(*s))
        {
            return Err(format!("error status {status} is not an HTTP error status"));
        }
        if !top_level && !self.endpoints.is_empty() {
            return Err("endpoint entries cannot have endpoints".into());
        }
        for (key, endpoint) in &self.endpoints {
            if EndpointKey::parse(key).is_none() {
                return Err(format!("endpoint key {key:?} must be \"<METHOD> /<path template>\""));
            }
            endpoint.validate(false).map_err(|e| format!("{key}: {e}"))?;
        }
        Ok(())
    }

    /// Total added latency for one request.
    fn latency(&self) -> Duration {
        let mut ms = 0.0;
        if let Some((min, max)) = self.latency_ms {
            ms += if max > min { (min + rand::random::<u64>() % (max - min + 1)) as f64 } else { min as f64 };
        }
        ms += self.latency_fixed_ms.unwrap_or(0) as f64;
        if let Some(jitter) = self.jitter_ms.filter(|j| *j > 0) {
            ms += (rand::random::<u64>() % (jitter + 1)) as f64;
        }
        if let Some(mean) = self.latency_exp_mean_ms.filter(|m| *m > 0.0) {
            let u: f64 = rand::random::<f64>().max(f64::MIN_POSITIVE);
            ms += (-mean * u.ln()).min(mean * 20.0);
        }
        Duration::from_secs_f64(ms / 1000.0)
    }

    /// The injected status for this request, if any.
    fn draw_error(&self) -> Option<u16> {
        if self.outage_until_ms.is_some_and(|until| crate::now_ms() < until) {
            return Some(503);
        }
        if self.error_rate > 0.0 && rand::random::<f64>() < self.error_rate {
            return Some(self.error_status.unwrap_or(503));
        }
        let mut roll = rand::random::<f64>();
        for (status, rate) in &self.error_rates {
            if roll < *rate {
                return Some(*status);
            }
            roll -= rate;
        }
        None
    }
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// A parsed `"<METHOD> <template>"` key.
struct EndpointKey<'a> {
    method: &'a str,
    segments: Vec<&'a str>,
}

impl<'a> EndpointKey<'a> {
    fn parse(key: &'a str) -> Option<Self> {
        let (method, template) = key.trim().split_once(' ')?;
        let template = template.trim();
        if method.is_empty() || !template.starts_with('/') {
            return None;
        }
        Some(Self { method, segments: template.split('/').filter(|s| !s.is_empty()).collect() })
    }

    /// `Some(literal segments)` when the key matches the request, for picking the most specific.
    fn matches(&self, method: &str, path: &[&str]) -> Option<usize> {
        if !self.method.eq_ignore_ascii_case(method) {
            return None;
        }
        let mut literals = 0;
        for (i, segment) in self.segments.iter().enumerate() {
            if segment.starts_with("{*") {
                return Some(literals);
            }
            let actual = path.get(i)?;
            if segment.starts_with('{') && segment.ends_with('}') {
                continue;
            }
            if segment != actual {
                return None;
            }
            literals += 1;
        }
        (path.len() == self.segments.len()).then_some(literals)
    }
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

    /// The settings that apply to one request: the most specific matching endpoint entry,
    /// else the simulator's own.
    pub fn effective(&self, simulator: &str, method: &str, path: &str) -> FaultConfig {
        let mut all = self.inner.lock().expect("faults lock");
        all.get_mut(simulator).map(|c| Self::entry(c, method, path).clone()).unwrap_or_default()
    }

    /// The entry of `config` that applies to one request.
    fn entry<'a>(config: &'a mut FaultConfig, method: &str, path: &str) -> &'a mut FaultConfig {
        let segments: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
        let best = config
            .endpoints
            .keys()
            .filter_map(|key| Some((EndpointKey::parse(key)?.matches(method, &segments)?, key)))
            .max_by_key(|(literals, _)| *literals)
            .map(|(_, key)| key.clone());
        match best {
            Some(key) => config.endpoints.get_mut(&key).expect("a key of the map"),
            None => config,
        }
    }

    /// Applies latency, then decides whether the request fails.
    pub async fn decide(&self, simulator: &str, method: &str, path: &str) -> FaultDecision {
        // The settings, with one of the entry's `fail_next` spent by this request.
        let (config, counted) = {
            let mut all = self.inner.lock().expect("faults lock");
            match all.get_mut(simulator) {
                Some(config) => {
                    let entry = Self::entry(config, method, path);
                    let counted = entry.pass_first == 0 && entry.fail_next > 0;
                    if entry.pass_first > 0 && entry.fail_next > 0 {
                        entry.pass_first -= 1;
                    } else {
                        entry.fail_next = entry.fail_next.saturating_sub(1);
                    }
                    (entry.clone(), counted)
                }
                None => (FaultConfig::default(), false),
            }
        };
        let delay = config.latency();
        if !delay.is_zero() {
            tokio::time::sleep(delay).await;
        }
        if counted {
            return FaultDecision::Fail(config.error_status.unwrap_or(503));
        }
        match config.draw_error() {
            Some(status) => FaultDecision::Fail(status),
            None => FaultDecision::Proceed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_endpoints(entries: &[(&str, FaultConfig)]) -> Faults {
        let faults = Faults::default();
        let endpoints = entries.iter().map(|(k, c)| ((*k).to_owned(), c.clone())).collect();
        faults.set("magento", FaultConfig { error_rate: 0.5, endpoints, ..FaultConfig::default() });
        faults
    }

    #[test]
    fn the_most_specific_matching_template_wins() {
        let orders = FaultConfig { latency_fixed_ms: Some(1), ..FaultConfig::default() };
        let any_store = FaultConfig { latency_fixed_ms: Some(2), ..FaultConfig::default() };
        let salable = FaultConfig { latency_fixed_ms: Some(3), ..FaultConfig::default() };
        let faults = with_endpoints(&[
            ("GET /rest/V1/orders", orders),
            ("GET /rest/{store}/V1/orders", any_store),
            ("GET /rest/{store}/V1/inventory/get-product-salable-quantity/{sku}/{stock_id}", salable),
        ]);
        let fixed = |m: &str, p: &str| faults.effective("magento", m, p).latency_fixed_ms;
        assert_eq!(fixed("GET", "/rest/V1/orders"), Some(1), "three literals beat two");
        assert_eq!(fixed("GET", "/rest/br/V1/orders"), Some(2));
        assert_eq!(fixed("GET", "/rest/all/V1/inventory/get-product-salable-quantity/SKU-1/1"), Some(3));
        assert_eq!(fixed("POST", "/rest/V1/orders"), None, "the method is part of the key");
        assert_eq!(faults.effective("magento", "GET", "/rest/V1/orders/1").error_rate, 0.5, "falls back");
    }

    #[test]
    fn validation_refuses_bad_rates_and_keys() {
        let bad_key = FaultConfig {
            endpoints: [("orders".to_owned(), FaultConfig::default())].into_iter().collect(),
            ..FaultConfig::default()
        };
        assert!(bad_key.validate(true).is_err());
        let too_much =
            FaultConfig { error_rates: [(429, 0.7), (500, 0.4)].into_iter().collect(), ..Default::default() };
        assert!(too_much.validate(true).is_err());
        let not_error = FaultConfig { error_rates: [(200, 0.1)].into_iter().collect(), ..Default::default() };
        assert!(not_error.validate(true).is_err());
    }

    #[tokio::test]
    async fn fail_next_fails_that_many_matching_requests_then_none() {
        let once = FaultConfig { fail_next: 2, ..FaultConfig::default() };
        let faults = Faults::default();
        let endpoints = [("PUT /jobs/{id}/batches".to_owned(), once)].into();
        faults.set("magento", FaultConfig { endpoints, ..FaultConfig::default() });
        let put = || faults.decide("magento", "PUT", "/jobs/7/batches");
        assert_eq!(faults.decide("magento", "GET", "/jobs/7").await, FaultDecision::Proceed, "other requests");
        assert_eq!(put().await, FaultDecision::Fail(503));
        assert_eq!(put().await, FaultDecision::Fail(503));
        assert_eq!(put().await, FaultDecision::Proceed, "spent");
        assert_eq!(faults.get("magento").endpoints["PUT /jobs/{id}/batches"].fail_next, 0);
    }

    #[tokio::test]
    async fn pass_first_lets_that_many_through_before_fail_next_counts() {
        let third = FaultConfig { pass_first: 2, fail_next: 1, ..FaultConfig::default() };
        let faults = Faults::default();
        faults.set(
            "magento",
            FaultConfig { endpoints: [("PUT /jobs/{id}".to_owned(), third)].into(), ..Default::default() },
        );
        let mut seen = Vec::new();
        for id in 0..4 {
            seen.push(faults.decide("magento", "PUT", &format!("/jobs/{id}")).await);
        }
        use FaultDecision::{Fail, Proceed};
        assert_eq!(seen, [Proceed, Proceed, Fail(503), Proceed]);
    }
}
