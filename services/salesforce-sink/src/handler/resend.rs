//! What a `RESEND` needs from the sink's state: forgetting a confirmed version.

use super::Sink;

impl Sink {
    /// Forgets what the sink confirmed for `key` (`order:<id>` or `customer:<customer key>`),
    /// so the next version of it is written even if it equals the confirmed one. Returns
    /// whether there was something to forget.
    pub fn forget(&self, key: &str) -> bool {
        self.confirmed.lock().expect("confirmed lock").remove(key).is_some()
    }
}
