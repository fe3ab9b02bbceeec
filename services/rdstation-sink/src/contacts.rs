//! Contacts: what a customer's RD contact should hold, and the writes that get it there
//! with as few requests as possible.
//!
//! - Fields go through `PATCH` (upsert), by `uuid:` once the contact's uuid is known (so an
//!   e-mail change updates the same contact, saas-apis.md §4 #14), by `email:` before. The
//!   body never carries `tags`: RD's PATCH replaces the list and would wipe tags marketers or
//!   other tools set (§4 #12).
//! - Tags go through `POST …/tag` (append), only the ones the contact lacks: the PATCH answer
//!   tells which it has, and `/tag` refuses a tag the contact already has (then the tags wait
//!   for the next sync, which reads the contact and PATCHes them). The tags Elo added
//!   are remembered (`owned_tags`); when no rule asks for one any more it is removed, the only
//!   way RD allows: read the contact's list and PATCH it back without that tag (one GET and
//!   the PATCH the fields need anyway). Tags Elo did not add are never removed.
//! - Tag posts have their own account-wide daily limit (15,000): each partition spends its
//!   share ([`crate::tag_posts`]); past it, tags are added like removed ones: read the
//!   contact's list and PATCH it back, fields and tags in one PATCH (RD allows 24 PATCHes per
//!   contact a day, so a sync never sends two). A contact Elo does not know yet is first
//!   upserted; its tags then wait for the next sync (deferred), which knows its uuid.
//! - The lifecycle stage goes through the default funnel.
//! - Nothing is written when the contact already holds what the sink last wrote (coalescing:
//!   a customer whose orders do not change their segment costs no contact request).

use std::collections::{BTreeMap, BTreeSet};

use futures::future::BoxFuture;
use reqwest::Method;
use serde_json::{Map, Value, json};

use crate::aggregates::{Aggregate, CustomerState};
use crate::client::{Budget, Error, RdClient, Result};
use crate::metrics;
use crate::rules::Verdict;

/// The custom fields the built-in mapping writes, with their RD data types.
pub const MAPPING_FIELDS: &[(&str, &str)] = &[
    ("cf_magento_customer_id", "STRING"),
    ("cf_last_order_id", "STRING"),
    ("cf_lifetime_value", "STRING"),
    ("cf_elo_order_count", "INTEGER"),
];

const LEGAL_BASIS_TYPES: &[&str] = &[
    "pre_existent_contract",
    "consent",
    "legitimate_interest",
    "judicial_process",
    "vital_interest",
    "public_interest",
];

/// What the contact should hold.
#[derive(Clone, Debug, PartialEq)]
pub struct Desired {
    /// PATCH body fields, `email` included (removed when it is the identifier).
    pub fields: Map<String, Value>,
    pub tags: BTreeSet<String>,
    pub stage: Option<String>,
}

/// The contact a customer's state and the rules' verdict call for.
pub fn desired(state: &CustomerState, aggregate: &Aggregate, verdict: &Verdict) -> Desired {
    let id = &state.identity;
    let mut f = Map::new();
    f.insert("email".into(), json!(id.email));
    let name = [id.firstname.as_deref(), id.lastname.as_deref()].into_iter().flatten().collect::<Vec<_>>().join(" ");
    let mut text = |key: &str, value: Option<&str>| {
        if let Some(v) = value.map(str::trim).filter(|v| !v.is_empty()) {
            f.insert(key.into(), json!(v));
        }
    };
    text("name", Some(&name));
    text("mobile_phone", id.phone.as_deref());
    text("city", id.city.as_deref());
    text("state", id.state.as_deref());
    text("country", id.country.as_deref());
    if matches!(id.consent.as_str(), "granted" | "declined") {
        let kind = id.legal_basis.as_deref().filter(|b| LEGAL_BASIS_TYPES.contains(b)).unwrap_or("consent");
        f.insert("legal_bases".into(), json!([{"category": "communications", "type": kind, "status": id.consent}]));
    }
    if let Some(customer_id) = id.customer_id {
        f.insert("cf_magento_customer_id".into(), json!(customer_id.to_string()));
    }
    if let Some(last) = &aggregate.last_order_id {
        f.insert("cf_last_order_id".into(), json!(last));
    }
    f.insert("cf_lifetime_value".into(), json!(format!("{:.2}", aggregate.monetary)));
    f.insert("cf_elo_order_count".into(), json!(aggregate.frequency));
    for (key, value) in &verdict.fields {
        f.insert(key.clone(), value.clone());
    }
    Desired { fields: f, tags: verdict.tags.clone(), stage: verdict.stage.clone() }
}

/// Whether bringing the contact to `desired` takes any request.
pub fn needs_write(state: &CustomerState, desired: &Desired) -> bool {
    planned_requests(state, desired, true) > 0
}

/// A stable fingerprint of a desired contact (FNV-1a over its JSON: kept in the state, so it
/// must not change between builds as `DefaultHasher` may).
pub fn fingerprint(desired: &Desired) -> u64 {
    let text = json!([desired.fields, desired.tags, desired.stage]).to_string();
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3))
}

/// Elo's tags the contact should lose.
pub fn tags_to_remove(state: &CustomerState, desired: &Desired) -> BTreeSet<String> {
    state.applied.owned_tags.difference(&desired.tags).cloned().collect()
}

/// How many contact requests bringing the contact to `desired` takes (at most; 0: none).
/// Without `tag_posts_left` (the partition's daily share of tag posts is spent) tags are added
/// by the read and PATCH that removing them takes.
pub fn planned_requests(state: &CustomerState, desired: &Desired, tag_posts_left: bool) -> u32 {
    let adding = !desired.tags.is_subset(&state.applied.tags);
    let mut n = 0;
    if by_patch(state, desired, tag_posts_left) {
        n += 2;
    } else {
        n += u32::from(state.contact_uuid.is_none() || desired.fields != state.applied.fields);
        n += u32::from(adding && tag_posts_left);
    }
    n + u32::from(desired.stage.as_ref().is_some_and(|s| state.applied.stage.as_ref() != Some(s)))
}

/// Whether the contact's tags go through a read and one PATCH (fields and tags together):
/// Elo removes one of its tags, adds tags with no tag posts left, or RD refused a tag post
/// because the contact holds one of them already (`tags_unknown`). Only for a contact whose
/// uuid Elo knows.
fn by_patch(state: &CustomerState, desired: &Desired, tag_posts_left: bool) -> bool {
    let adding = !desired.tags.is_subset(&state.applied.tags);
    let changed = !tags_to_remove(state, desired).is_empty() || adding && (!tag_posts_left || state.tags_unknown);
    state.contact_uuid.is_some() && changed
}

/// Writes a customer's state (to the state store), for [`sync`].
pub type Persist<'a> = &'a (dyn Fn(CustomerState) -> BoxFuture<'a, Result<()>> + Send + Sync);

/// The partition's daily share of tag posts ([`crate::tag_posts`]), for [`sync`].
pub trait TagPosts: Send + Sync {
    /// Whether the share has room for a post now.
    fn left(&self) -> bool;
    /// Counts one post against the share (saved before the post is sent): the hour it was
    /// counted in, or `None` when the share is spent.
    fn take(&self) -> BoxFuture<'_, Result<Option<i64>>>;
    /// Gives back a post counted in `hour` and never sent (no budget slot, no token).
    fn give_back(&self, hour: i64) -> BoxFuture<'_, Result<()>>;
}

/// Brings the contact to `desired`, updating `state.applied` and `state.contact_uuid` step by
/// step (a failure half-way leaves the state saying what did land). Returns the number of
/// writes made (0: coalesced).
///
/// `persist` is called with the state right before tags are added, recording them as Elo's
/// first: a crash after RD added them must not leave Elo taking its own tags for someone
/// else's (it would then never remove them). The cost of that order: a marketer adding the
/// very same tag between a crash and the next sync could see Elo remove it later.
pub async fn sync(
    client: &RdClient,
    state: &mut CustomerState,
    desired: &Desired,
    persist: Persist<'_>,
    tag_posts: &dyn TagPosts,
) -> Result<usize> {
    let mut writes = 0;
    let mut current_tags: Option<BTreeSet<String>> = None;
    if state.contact_uuid.is_none() {
        // A contact Elo does not know holds no tag of Elo's.
        state.applied.owned_tags.clear();
    }
    let remove = tags_to_remove(state, desired);
    let tag_posts_left = tag_posts.left();
    if let Some(uuid) = state.contact_uuid.clone().filter(|_| by_patch(state, desired, tag_posts_left)) {
        let path = format!("/platform/contacts/uuid:{uuid}");
        match client.request(Method::GET, &path, None, Budget::Contacts).await {
            Ok(contact) => {
                // PATCH replaces the list: the contact's tags as read, less Elo's stale ones,
                // plus the ones Elo wants (a tag added by someone else between the read and
                // the write would be lost: the read is kept right before the write).
                let have = tags_of(&contact);
                let added: BTreeSet<String> = desired.tags.difference(&have).cloned().collect();
                let list: BTreeSet<&String> = have.difference(&remove).chain(&desired.tags).collect();
                let mut body = desired.fields.clone();
                body.insert("tags".into(), json!(list));
                let contact =
                    client.request(Method::PATCH, &path, Some(&Value::Object(body)), Budget::Contacts).await?;
                metrics::CONTACT_WRITES.with_label_values(&["upsert"]).inc();
                let kind = if remove.is_empty() { "tag_by_patch" } else { "untag" };
                metrics::CONTACT_WRITES.with_label_values(&[kind]).inc();
                writes += 1;
                state.applied.fields = desired.fields.clone();
                let owned = &mut state.applied.owned_tags;
                owned.retain(|t| !remove.contains(t));
                owned.extend(added);
                state.tags_unknown = false;
                current_tags = Some(tags_of(&contact));
            }
            // Deleted in RD meanwhile: the upsert below creates it again, without Elo's tags.
            Err(Error::Refused { status: 404, .. }) => {
                state.contact_uuid = None;
                state.applied.owned_tags.clear();
            }
            Err(e) => return Err(e),
        }
    }
    if current_tags.is_none() && (state.contact_uuid.is_none() || desired.fields != state.applied.fields) {
        let contact = upsert(client, state, &desired.fields).await?;
        writes += 1;
        state.contact_uuid =
            contact.get("uuid").and_then(Value::as_str).map(str::to_owned).or(state.contact_uuid.take());
        current_tags = Some(tags_of(&contact));
        state.applied.fields = desired.fields.clone();
    }
    let uuid = state.contact_uuid.clone().ok_or_else(|| Error::Transient("contact uuid unknown".into()))?;
    let known = current_tags.as_ref().unwrap_or(&state.applied.tags);
    let missing: Vec<String> = desired.tags.iter().filter(|t| !known.contains(*t)).cloned().collect();
    // The tags wait for the contact's next sync (deferred): it reads the contact and PATCHes
    // them (`by_patch`). The rest of this sync (the stage) still goes out.
    let mut tags_wait: Option<&'static str> = None;
    if !missing.is_empty() && !tag_posts_left {
        // Just upserted (its uuid was unknown): a second PATCH would be two in one sync.
        tags_wait = Some("tag_posts_spent");
    } else if !missing.is_empty() {
        let owned_before = state.applied.owned_tags.clone();
        state.applied.owned_tags.extend(missing.iter().cloned());
        persist(state.clone()).await?;
        let sent_before = client.writes_sent();
        match add_tags(client, &uuid, &missing, tag_posts).await {
            Ok(TagPost::Added) => writes += 1,
            Ok(TagPost::SharesSpent) => {
                state.applied.owned_tags = owned_before;
                // Saved now: a later step failing keeps the stored state, which must not
                // claim tags Elo never added.
                persist(state.clone()).await?;
                tags_wait = Some("tag_posts_spent");
            }
            Ok(TagPost::ContactHasOne) => {
                // Someone else's tag (an automation, a marketer) is among them: which of them
                // the contact holds is unknown, so none is recorded as Elo's, and the next
                // sync reads the contact.
                state.applied.owned_tags = owned_before;
                state.tags_unknown = true;
                persist(state.clone()).await?;
                tags_wait = Some("tags_changed_in_rd");
            }
            Err(error) => {
                if client.writes_sent() == sent_before {
                    // Never sent: the contact holds none of them because of Elo.
                    state.applied.owned_tags = owned_before;
                    if let Err(failure) = persist(state.clone()).await {
                        tracing::warn!(error = %failure, "cannot save the contact's tags as not Elo's");
                    }
                }
                return Err(error);
            }
        }
    }
    if tags_wait.is_none() {
        // Only the tags Elo wants are remembered as applied: others' tags are not Elo's to track.
        state.applied.tags = desired.tags.clone();
    }
    if let Some(stage) = &desired.stage
        && state.applied.stage.as_ref() != Some(stage)
    {
        let path = format!("/platform/contacts/uuid:{uuid}/funnels/default");
        client.request(Method::PUT, &path, Some(&json!({"lifecycle_stage": stage})), Budget::Contacts).await?;
        metrics::CONTACT_WRITES.with_label_values(&["funnel"]).inc();
        writes += 1;
        state.applied.stage = Some(stage.clone());
    }
    match tags_wait {
        Some(reason) => Err(Error::Deferred(reason)),
        None => Ok(writes),
    }
}

async fn upsert(client: &RdClient, state: &mut CustomerState, fields: &Map<String, Value>) -> Result<Value> {
    if let Some(uuid) = state.contact_uuid.clone() {
        let path = format!("/platform/contacts/uuid:{uuid}");
        match client.request(Method::PATCH, &path, Some(&Value::Object(fields.clone())), Budget::Contacts).await {
            Ok(contact) => {
                metrics::CONTACT_WRITES.with_label_values(&["upsert"]).inc();
                return Ok(contact);
            }
            // Deleted in RD meanwhile: upsert by e-mail below creates it again.
            Err(Error::Refused { status: 404, .. }) => {
                state.contact_uuid = None;
                state.applied.owned_tags.clear();
            }
            Err(e) => return Err(e),
        }
    }
    let mut body = fields.clone();
    let email = body.remove("email").and_then(|e| e.as_str().map(str::to_owned)).unwrap_or_default();
    if email.is_empty() {
        return Err(Error::Refused { status: 400, code: "no_email".into(), message: "customer has no e-mail".into() });
    }
    let path = format!("/platform/contacts/email:{}", percent_encode(&email));
    let contact = client.request(Method::PATCH, &path, Some(&Value::Object(body)), Budget::Contacts).await?;
    metrics::CONTACT_WRITES.with_label_values(&["upsert"]).inc();
    Ok(contact)
}

/// What a tag post did.
enum TagPost {
    Added,
    /// The partition's share was spent (another contact took the last post since the sync
    /// began): nothing sent.
    SharesSpent,
    /// RD refused it with `VALUES_MUST_BE_UNIQUE`: the contact holds one of the tags already.
    ContactHasOne,
}

/// Appends tags with one tag post, counted against the partition's daily share first and
/// given back when it never left (no budget slot, no access token).
async fn add_tags(client: &RdClient, uuid: &str, tags: &[String], tag_posts: &dyn TagPosts) -> Result<TagPost> {
    let Some(hour) = tag_posts.take().await? else { return Ok(TagPost::SharesSpent) };
    let path = format!("/platform/contacts/uuid:{uuid}/tag");
    let sent_before = client.writes_sent();
    match client.request(Method::POST, &path, Some(&json!({"tags": tags})), Budget::Contacts).await {
        Ok(_) => {
            metrics::CONTACT_WRITES.with_label_values(&["tag"]).inc();
            Ok(TagPost::Added)
        }
        Err(Error::Refused { code, .. }) if code == "VALUES_MUST_BE_UNIQUE" => Ok(TagPost::ContactHasOne),
        Err(error) => {
            if client.writes_sent() == sent_before
                && let Err(failure) = tag_posts.give_back(hour).await
            {
                tracing::warn!(error = %failure, "cannot give back a tag post that was never sent");
            }
            Err(error)
        }
    }
}

/// Removes an erased customer's contacts from RD (one already gone is fine): by uuid once known
/// (it follows e-mail changes), and by the e-mail Elo holds now when that is not the e-mail the
/// known contact was written with. A contact whose write was deferred has no uuid yet, and a
/// changed e-mail may not have reached the known contact yet, but RD may hold a contact under
/// it all the same (the customer's events carried the e-mail, or a marketer created it).
pub async fn erase(client: &RdClient, state: &CustomerState) -> Result<()> {
    let email = state.identity.email.as_str();
    let written = state.applied.fields.get("email").and_then(Value::as_str);
    if let Some(uuid) = &state.contact_uuid {
        delete(client, &format!("uuid:{uuid}")).await?;
        if written == Some(email) {
            return Ok(());
        }
    }
    if email.is_empty() { Ok(()) } else { delete(client, &format!("email:{}", percent_encode(email))).await }
}

/// Deletes the contact `identifier` (`uuid:…` or `email:…`); one already gone is deleted.
async fn delete(client: &RdClient, identifier: &str) -> Result<()> {
    match client.request(Method::DELETE, &format!("/platform/contacts/{identifier}"), None, Budget::Contacts).await {
        Ok(_) | Err(Error::Refused { status: 404, .. }) => {
            metrics::CONTACT_WRITES.with_label_values(&["delete"]).inc();
            Ok(())
        }
        Err(e) => Err(e),
    }
}

fn tags_of(contact: &Value) -> BTreeSet<String> {
    contact
        .get("tags")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .map(str::to_owned)
        .collect()
}

/// Checks that every custom field the sink writes exists in the account, creating the missing
/// ones when `create` is set. Returns the fields still missing.
pub async fn ensure_fields(
    client: &RdClient,
    needed: &BTreeMap<String, &'static str>,
    create: bool,
) -> Result<Vec<String>> {
    let listed = client.request(Method::GET, "/platform/contacts/fields", None, Budget::Contacts).await?;
    let have: BTreeSet<&str> = listed
        .get("fields")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(|f| f.get("api_identifier").and_then(Value::as_str))
        .collect();
    let mut missing = Vec::new();
    for (field, data_type) in needed.iter().filter(|(f, _)| !have.contains(f.as_str())) {
        if !create {
            missing.push(field.clone());
            continue;
        }
        let presentation = match *data_type {
            "INTEGER" => "NUMBER_INPUT",
            "BOOLEAN" => "CHECK_BOX",
            _ => "TEXT_INPUT",
        };
        let label = field.trim_start_matches("cf_").replace('_', " ");
        let body = json!({"api_identifier": field, "data_type": data_type, "presentation_type": presentation,
            "name": {"default": label, "pt-BR": label}, "label": {"default": label, "pt-BR": label}});
        match client.request(Method::POST, "/platform/contacts/fields", Some(&body), Budget::Contacts).await {
            Ok(_) => tracing::info!(field = %field, data_type, "custom field created in rd station"),
            Err(Error::Refused { code, .. }) if code == "TAKEN" => {}
            Err(e) => return Err(e),
        }
    }
    Ok(missing)
}

/// The fields the built-in mapping and the rules need.
pub fn needed_fields(rules: &crate::rules::Rules) -> BTreeMap<String, &'static str> {
    let mut out: BTreeMap<String, &'static str> = MAPPING_FIELDS.iter().map(|(k, v)| ((*k).to_owned(), *v)).collect();
    out.extend(rules.field_types());
    out
}

fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' | b'@' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use elo_events::sample;

    use super::*;
    use crate::rules::Rules;

    #[test]
    fn desired_contact_carries_identity_consent_and_rule_fields_but_no_tags() {
        let mut state = CustomerState::default();
        state.apply(&sample::order_placed(1));
        let rules = Rules::parse("[[rule]]\nname = \"b\"\nwhen = { frequency_gte = 1 }\ntags = [\"buyer\"]\nstage = \"Client\"\nfields = { cf_seg = \"b\" }\n", "t").unwrap();
        let agg = state.aggregate(0);
        let d = desired(&state, &agg, &rules.evaluate(&agg));
        assert_eq!(d.fields["email"], "customer1@example.com");
        assert_eq!(d.fields["name"], "Ana Souza");
        assert_eq!(d.fields["state"], "SP");
        assert_eq!(d.fields["legal_bases"][0]["status"], "granted");
        assert_eq!(d.fields["cf_seg"], "b");
        assert_eq!(d.fields["cf_elo_order_count"], 1);
        assert!(!d.fields.contains_key("tags"), "PATCH would replace the contact's tags");
        assert_eq!(d.tags.iter().collect::<Vec<_>>(), ["buyer"]);
        assert_eq!(d.stage.as_deref(), Some("Client"));
    }

    #[test]
    fn emails_are_encoded_in_paths() {
        assert_eq!(percent_encode("a+b@x.com"), "a%2Bb@x.com");
    }
}
