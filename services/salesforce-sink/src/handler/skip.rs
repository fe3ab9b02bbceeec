//! The repeat-buyer skip: a customer whose data Salesforce already holds costs only its
//! orders' nodes. The confirmed state keeps a fingerprint of the customer nodes last written
//! (`Confirmed::digest`, FNV-1a) and when (`digest_at`), never the data itself. A key's
//! Account and Contact are left out of its graphs only when all hold:
//!
//! - the batch's newest customer data the key may write has the confirmed digest (checked by
//!   the graph builder on the data it would write, also in the retry rounds);
//! - the digest was confirmed by a write that carried the nodes less than
//!   `ELO_SALESFORCE_CUSTOMER_REWRITE_AFTER` ago: an Account or Contact changed or deleted
//!   behind Elo's back is rewritten by the customer's next order after that (the reconciler
//!   sweeps Accounts, not Contacts);
//! - no RESEND of any of the customer's entries is in the batch (a RESEND also forgets the
//!   digest, so the customer's next event is written in full);
//! - the records are written under their own key: one written under an alias (a guest who
//!   registered) writes its newer customer data over the owner's Account and Contact, as
//!   without the skip, and is never left out: the owner's fingerprint is kept on the owner's
//!   partition and does not know what an alias wrote. The owner's own orders may then be left
//!   out against it until the window ends: the alias's data (the same person's, as typed last
//!   through the other key) stays meanwhile, and for good if the owner sends nothing after the
//!   window (without the skip, the owner's order in the window would have rewritten it).
//!
//! An order refused because its Account is gone while its graph left the customer out is
//! sent again at once with the customer's nodes (in every retry round).

use std::collections::{HashMap, HashSet};

use elo_kafka::HandlerError;

use super::{Confirmed, Sink, Verdict, customer_entity_key, customer_ids_written, now_ms};
use crate::graph::Work;

impl Sink {
    /// Sets each record's `held_digest`: the digest its key's customer nodes are left out
    /// for, when the key may skip at all (see the module's rules). One answer per key.
    pub(super) fn plan_skips(&self, partition: i32, work: &mut [Work<'_>], rewrites: &HashSet<&str>) {
        let now = now_ms();
        let window = i64::try_from(self.customer_rewrite_after.as_millis()).unwrap_or(i64::MAX);
        let mut held: HashMap<String, Option<u64>> = HashMap::new();
        for w in work.iter_mut() {
            let key = w.event.customer_key.as_str();
            w.held_digest = *held.entry(key.to_owned()).or_insert_with(|| {
                if rewrites.contains(key) {
                    return None;
                }
                let c = self.confirmed.get(partition, &customer_entity_key(key))?;
                // A `digest_at` ahead of this clock (another replica's) is not taken as fresh.
                let fresh = c.digest_at > 0 && (0..window).contains(&now.saturating_sub(c.digest_at));
                (fresh && c.digest != 0 && c.alias.is_none() && !c.rewrite && c.target_ids.contains_key("Account"))
                    .then_some(c.digest)
            });
        }
    }

    /// After a batch with a RESEND of the customer: unless the batch wrote the customer in
    /// full (its digest confirmed since `started`), the digest is forgotten, so its next event
    /// is written with the Account and Contact (the refetch the RESEND triggered brings the
    /// newest data). Best effort: a failed state write leaves the window to bound it.
    pub(super) async fn forget_resent_digests(&self, partition: i32, rewrites: &HashSet<&str>, started: i64) {
        for key in rewrites {
            let key = customer_entity_key(key);
            let Some(mut c) = self.confirmed.get(partition, &key) else { continue };
            if c.digest == 0 || c.digest_at >= started {
                continue;
            }
            (c.digest, c.digest_at) = (0, 0);
            if let Err(e) = self.confirmed.put(partition, &key, c).await {
                tracing::warn!(error = %e, partition, "resent customer's digest not forgotten");
            }
        }
    }

    /// A record whose graph left its customer data out (Salesforce holds it) still names the
    /// Account and Contact in its outcome, as a full write would have: the reconciler learns
    /// the Accounts to watch from the outcomes. (A record whose customer data is older than
    /// confirmed never writes or names them, skip or not.)
    pub(super) fn name_held_customers(&self, partition: i32, work: &[Work<'_>], verdicts: &mut [Option<Verdict>]) {
        let mut known: HashMap<&str, Option<Confirmed>> = HashMap::new();
        for w in work.iter().filter(|w| w.write_customer && w.held_digest.is_some()) {
            let Some(verdict) = verdicts[w.index].as_mut().filter(|v| v.result.is_ok()) else { continue };
            if verdict.target_ids.contains_key("Account") {
                continue;
            }
            let key = w.event.customer_key.as_str();
            let held = known.entry(key).or_insert_with(|| self.confirmed.get(partition, &customer_entity_key(key)));
            for (object, id) in held.iter().flat_map(|c| &c.target_ids).filter(|(o, _)| *o != "Order") {
                verdict.target_ids.entry(object.clone()).or_insert_with(|| id.clone());
            }
        }
    }

    /// Records written under an alias (`own`: index and their own customer key) name the
    /// owner's Account and Contact they reference (the ids stored with the alias), as when
    /// they wrote them.
    pub(super) fn name_alias_customers(&self, partition: i32, own: &[(usize, &str)], verdicts: &mut [Option<Verdict>]) {
        for (index, own_key) in own {
            let Some(verdict) = verdicts[*index].as_mut().filter(|v| v.result.is_ok()) else { continue };
            let Some(alias) = self.confirmed.get(partition, &customer_entity_key(own_key)) else { continue };
            for (object, id) in alias.target_ids.iter().filter(|(o, _)| *o != "Order") {
                verdict.target_ids.entry(object.clone()).or_insert_with(|| id.clone());
            }
        }
    }
}

/// The digest and its time after an applied record of the key: left out (its data has the
/// digest held), Salesforce still holds that data as confirmed then; written, it holds it now.
pub(super) fn set_digest(c: &mut Confirmed, digest: u64, held: Option<u64>, now: i64) {
    if held != Some(digest) || c.digest != digest {
        (c.digest, c.digest_at) = (digest, if held == Some(digest) { 0 } else { now });
    }
}

/// Whether a record was refused because its Account is not in Salesforce. Salesforce:
/// "Foreign key external ID: c:4 not found for field Elo_Id__c in entity Account".
fn account_gone(v: &Verdict) -> bool {
    v.result.as_ref().is_err_and(|e| {
        e.code == "INVALID_FIELD"
            && e.message.contains("Foreign key external ID")
            && e.message.contains("not found")
            && e.message.contains("in entity Account")
    })
}

/// Records refused because their Account is gone (deleted or merged behind Elo's back) while
/// their key's graphs left the customer out, or after another record of the batch recreated
/// it: their key's graphs carry the customer from now on and the refused records (and those
/// rolled back with them) are sent again in this call.
/// `restored`: the keys restored earlier in the same call (their records' digests are cleared
/// already, and the record carrying the customer's nodes may have failed transiently): one of
/// their records refused again is resent again, not dead-lettered.
pub(super) fn restore_gone_accounts(
    work: &mut [Work<'_>],
    verdicts: &mut [Option<Verdict>],
    restored: &mut HashSet<String>,
) {
    let written = customer_ids_written(work, verdicts);
    let keys: HashSet<String> = work
        .iter()
        .filter(|w| verdicts[w.index].as_ref().is_some_and(account_gone))
        .filter(|w| {
            let key = w.event.customer_key.as_str();
            w.held_digest.is_some() || written.contains_key(key) || restored.contains(key)
        })
        .map(|w| w.event.customer_key.clone())
        .collect();
    if keys.is_empty() {
        return;
    }
    let new = keys.iter().filter(|k| !restored.contains(*k)).count();
    crate::metrics::CUSTOMER_HEADS.with_label_values(&["gone"]).inc_by(new as u64);
    restored.extend(keys.iter().cloned());
    for w in work.iter_mut().filter(|w| keys.contains(&w.event.customer_key)) {
        w.held_digest = None;
        if let Some(v) = verdicts[w.index].as_mut().filter(|v| account_gone(v) || v.retry_in_call) {
            tracing::info!(record = w.index, "account gone: resent with its customer's nodes");
            v.retry_in_call = true;
        }
    }
}

/// After the last retry round: records marked for a resend with their customer's nodes (their
/// Account is gone) that no round is left for fail transiently instead of being dead-lettered.
pub(super) fn hold_gone_for_the_runtime(verdicts: &mut [Option<Verdict>]) {
    for v in verdicts.iter_mut().flatten().filter(|v| v.retry_in_call && account_gone(v)) {
        let message = "the Account is gone; resent with the customer's nodes on the next try";
        *v = Verdict::failed(HandlerError::transient("account_gone", message));
    }
}
