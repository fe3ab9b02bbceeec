//! What a `RESEND` needs from the sink's state: the confirmed version marked for rewriting.

use super::Sink;

impl Sink {
    /// Marks what the sink confirmed for `key` (`order:<id>` or `customer:<customer key>`) on
    /// `partition` so that the next event at that same version is written again (see
    /// [`super::Confirmed::rewrite`]). The version is kept: older versions (a late duplicate, a
    /// replayed dead letter) are still skipped and an erasure's floor still holds. Returns
    /// whether there was a confirmation to mark; the mark is stored before the command is
    /// reported done.
    pub async fn request_rewrite(&self, partition: i32, key: &str) -> Result<bool, elo_kafka::Error> {
        let Some(mut confirmed) = self.confirmed.get(partition, key) else { return Ok(false) };
        if confirmed.rewrite {
            return Ok(true);
        }
        confirmed.rewrite = true;
        self.confirmed.put(partition, key, confirmed).await?;
        Ok(true)
    }
}
