//! What a `RESEND` needs from the sink's state: the confirmed version marked for rewriting,
//! and the customer's digest forgotten (Salesforce may no longer hold that data, so the
//! customer's next write carries its Account and Contact in full).

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
        if confirmed.rewrite && confirmed.digest == 0 {
            return Ok(true);
        }
        confirmed.rewrite = true;
        (confirmed.digest, confirmed.digest_at) = (0, 0);
        self.confirmed.put(partition, key, confirmed).await?;
        Ok(true)
    }

    /// Forgets the digest confirmed for `customer_key` on `partition` (a RESEND of any of the
    /// customer's entries): whatever the resent event carries, the customer's next event is
    /// written with its Account and Contact, never left out as unchanged.
    pub async fn forget_customer_digest(&self, partition: i32, customer_key: &str) -> Result<(), elo_kafka::Error> {
        let key = super::customer_entity_key(customer_key);
        let Some(mut confirmed) = self.confirmed.get(partition, &key) else { return Ok(()) };
        if confirmed.digest == 0 {
            return Ok(());
        }
        (confirmed.digest, confirmed.digest_at) = (0, 0);
        self.confirmed.put(partition, &key, confirmed).await
    }
}
