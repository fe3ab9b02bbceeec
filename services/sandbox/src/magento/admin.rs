//! What a store admin does in the back office, driven by the control API: mass status changes
//! (one transaction, one `updated_at` for every order, as the admin grid's mass actions do).

use serde_json::json;

use super::{Magento, fmt_ts};
use crate::now_ms;

/// A mass status change: `POST /magento/orders/mass-status`.
#[derive(Clone, Debug, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MassStatus {
    pub status: String,
    /// The order state; by default the state Magento assigns to the status, else unchanged.
    #[serde(default)]
    pub state: Option<String>,
    /// Orders to change (all when absent).
    #[serde(default)]
    pub ids: Option<Vec<i64>>,
    /// At most this many orders, lowest `entity_id` first.
    #[serde(default)]
    pub limit: Option<usize>,
    /// Queue the webhook notification each change would send.
    #[serde(default)]
    pub notify: bool,
}

/// The state Magento's default `sales_order_status_state` table gives a status.
fn default_state(status: &str) -> Option<&'static str> {
    Some(match status {
        "pending" => "new",
        "pending_payment" => "pending_payment",
        "processing" | "fraud" => "processing",
        "holded" => "holded",
        "complete" => "complete",
        "closed" => "closed",
        "canceled" => "canceled",
        "payment_review" => "payment_review",
        _ => return None,
    })
}

impl Magento {
    /// Applies a mass status change; returns how many orders changed and their `updated_at`.
    pub fn mass_status(&mut self, change: &MassStatus) -> (usize, String) {
        let updated_at = fmt_ts(now_ms());
        let state = change.state.clone().or_else(|| default_state(&change.status).map(str::to_owned));
        let mut ids: Vec<i64> = match &change.ids {
            Some(ids) => ids.iter().copied().filter(|id| self.orders.contains_key(id)).collect(),
            None => self.orders.keys().copied().collect(),
        };
        ids.sort_unstable();
        ids.dedup();
        ids.truncate(change.limit.unwrap_or(usize::MAX));
        for id in &ids {
            let order = self.orders.get_mut(id).expect("filtered above");
            order["status"] = json!(change.status);
            if let Some(state) = &state {
                order["state"] = json!(state);
            }
            order["updated_at"] = json!(updated_at);
            if change.notify {
                self.notify(*id);
            }
        }
        (ids.len(), updated_at)
    }
}
