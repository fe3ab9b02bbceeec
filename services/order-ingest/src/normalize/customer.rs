//! Customer records and erasures to `CommerceEvent`s.

use elo_events::{
    CommerceEvent, CommerceEventType, ConsentStatus, Customer, CustomerErasure, MarketingConsent, SourceVersion, ids,
};
use serde_json::Value;

use super::time::parse_magento_time;
use super::{NormalizeError, Stores, int, leaf, opt_text, store_ref, text, time};

/// Marketing consent from a customer record (`extension_attributes.is_subscribed`, Magento's
/// newsletter subscription, the opt-in LGPD's "consent" basis rests on). Unknown without a record.
pub fn consent_of(customer: Option<&Value>) -> MarketingConsent {
    let status = match customer.and_then(|c| c.pointer("/extension_attributes/is_subscribed")).and_then(Value::as_bool)
    {
        Some(true) => ConsentStatus::Granted,
        Some(false) => ConsentStatus::Declined,
        None => ConsentStatus::Unknown,
    };
    MarketingConsent {
        status,
        legal_basis: (status != ConsentStatus::Unknown).then(|| "consent".to_owned()),
        updated_at: customer.and_then(|c| c.get("updated_at")).and_then(Value::as_str).and_then(parse_magento_time),
    }
}

/// `CUSTOMER_CHANGED` from a customer record (`GET /V1/customers/{id}`), keyed `c:<id>`.
pub fn customer_event(customer: &Value, stores: &Stores, produced_at: i64) -> Result<CommerceEvent, NormalizeError> {
    let id = int(&leaf(customer, "id"), "id")?;
    let updated_at = time(&leaf(customer, "updated_at"), "updated_at")?;
    let email = ids::normalise_email(text(&leaf(customer, "email"), "email")?);
    let entity = id.to_string();
    // The default billing address holds the phone Magento knows for the person.
    let addresses = customer.get("addresses").and_then(Value::as_array);
    let billing = addresses.and_then(|a| {
        a.iter().find(|x| x.get("default_billing").and_then(Value::as_bool) == Some(true)).or_else(|| a.first())
    });
    let mut event = CommerceEvent {
        event_id: String::new(), // named after the content, below
        event_type: CommerceEventType::CustomerChanged,
        source_system: "magento".into(),
        source_version: SourceVersion { entity_type: "customer".into(), entity_id: entity, updated_at },
        occurred_at: updated_at,
        produced_at,
        customer_key: ids::customer_key(Some(id), &email),
        store: store_ref(stores, leaf(customer, "store_id").int().unwrap_or(0)),
        order: None,
        customer: Some(Customer {
            customer_id: Some(id),
            is_guest: false,
            email,
            firstname: opt_text(&leaf(customer, "firstname")),
            lastname: opt_text(&leaf(customer, "lastname")),
            group_id: leaf(customer, "group_id").int().map(|g| g as i32),
            phone: billing.and_then(|b| opt_text(&leaf(b, "telephone"))),
            consent: consent_of(Some(customer)),
        }),
        erasure: None,
    };
    event.event_id = super::version_id("customer", &event);
    Ok(event)
}

/// Who must be forgotten, and why (`customer_deleted` or `erasure_request`).
#[derive(Clone, Debug, PartialEq)]
pub struct ErasureRequest {
    pub customer_id: Option<i64>,
    pub email: String,
    pub reason: &'static str,
    pub store_id: i64,
    /// When the deletion or request happened (ms, UTC).
    pub requested_at: i64,
    /// The notification's own id (a CloudEvent `id`, a privacy tool's `request_id`), if any.
    pub request_ref: Option<String>,
}

/// `CUSTOMER_ERASED` events: one on the registered key `c:<id>` and one on the e-mail's guest
/// key `g:<sha256>`, so consumers partitioned by customer key see the erasure wherever that
/// person's history lives. The address itself is not republished: only its hash.
pub fn erasure_events(
    request: &ErasureRequest,
    stores: &Stores,
    produced_at: i64,
) -> Result<Vec<CommerceEvent>, NormalizeError> {
    let email = ids::normalise_email(&request.email);
    if email.is_empty() || !email.contains('@') {
        return Err(NormalizeError::Invalid { field: "email", reason: "an erasure needs the person's e-mail".into() });
    }
    let mut keys = vec![ids::customer_key(None, &email)];
    if let Some(id) = request.customer_id {
        keys.insert(0, ids::customer_key(Some(id), &email));
    }
    Ok(keys
        .into_iter()
        .map(|key| CommerceEvent {
            // Each request is its own fact: asking again (say, after a backfill) is a new event,
            // while a retried delivery of the same notification keeps its id.
            event_id: ids::event_id(&[
                "magento",
                "customer-erased",
                &key,
                request.reason,
                &request.requested_at.to_string(),
                request.request_ref.as_deref().unwrap_or_default(),
            ]),
            event_type: CommerceEventType::CustomerErased,
            source_system: "magento".into(),
            source_version: SourceVersion {
                entity_type: "customer".into(),
                entity_id: request.customer_id.map_or_else(|| key.clone(), |id| id.to_string()),
                updated_at: request.requested_at,
            },
            occurred_at: request.requested_at,
            produced_at,
            customer_key: key,
            store: store_ref(stores, request.store_id),
            order: None,
            customer: None,
            erasure: Some(CustomerErasure {
                customer_id: request.customer_id,
                email_sha256: ids::email_sha256(&email),
                reason: request.reason.to_owned(),
            }),
        })
        .collect())
}
