//! `RESEND` commands, shared by the reconciler (which asks) and the sinks (which act).
//!
//! A `RESEND` names one sink (`target_service`) and one entity by its ledger key
//! (`entity_id` = `order:<id>` or `customer:<id>`). The sink forgets what it believed the
//! target holds for that entity (the version it confirmed, the contact it wrote), then asks
//! order-ingest to refetch the entity ([`refetch_after_resend`]). Forgetting first and
//! refetching second is what makes the repair land: the republished version, equal to the one
//! the sink confirmed, is written again instead of being skipped as already applied, and the
//! ordering holds because the refetch is only requested once the sink has forgotten.

use crate::{CommandType, IntegrationCommand};

/// The entity a `RESEND` names: (`order` | `customer`, Magento id).
pub fn entity(command: &IntegrationCommand) -> Option<(&str, &str)> {
    let (kind, id) = command.entity_id.split_once(':')?;
    matches!(kind, "order" | "customer").then_some((kind, id)).filter(|(_, id)| !id.is_empty())
}

/// The `REFETCH_*` for order-ingest that completes a `RESEND` `sink` has executed; `None`
/// when the command is not a well-formed `RESEND`.
pub fn refetch_after_resend(command: &IntegrationCommand, sink: &str, now_ms: i64) -> Option<IntegrationCommand> {
    if command.command_type != CommandType::Resend {
        return None;
    }
    let (kind, id) = entity(command)?;
    Some(IntegrationCommand {
        command_id: crate::ids::event_id(&[sink, &command.command_id, "refetch"]),
        command_type: if kind == "order" { CommandType::RefetchOrder } else { CommandType::RefetchCustomer },
        target_service: "order-ingest".into(),
        customer_key: command.customer_key.clone(),
        entity_id: id.to_owned(),
        store_id: command.store_id,
        reason: command.reason.clone(),
        requested_by: sink.to_owned(),
        requested_at: now_ms,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resend(entity_id: &str) -> IntegrationCommand {
        IntegrationCommand {
            command_id: "r1".into(),
            command_type: CommandType::Resend,
            target_service: "salesforce-sink".into(),
            customer_key: "c:1".into(),
            entity_id: entity_id.into(),
            store_id: Some(2),
            reason: "drift".into(),
            requested_by: "reconciler".into(),
            requested_at: 0,
        }
    }

    #[test]
    fn a_resend_becomes_the_refetch_of_its_entity() {
        let r = refetch_after_resend(&resend("order:42"), "salesforce-sink", 7).unwrap();
        assert_eq!(
            (r.command_type, r.target_service.as_str(), r.entity_id.as_str(), r.customer_key.as_str()),
            (CommandType::RefetchOrder, "order-ingest", "42", "c:1")
        );
        assert_eq!((r.store_id, r.requested_by.as_str(), r.requested_at), (Some(2), "salesforce-sink", 7));
        assert_eq!(r, refetch_after_resend(&resend("order:42"), "salesforce-sink", 7).unwrap(), "deterministic");
        let c = refetch_after_resend(&resend("customer:5"), "rdstation-sink", 7).unwrap();
        assert_eq!((c.command_type, c.entity_id.as_str()), (CommandType::RefetchCustomer, "5"));
    }

    #[test]
    fn malformed_resends_and_other_commands_are_refused() {
        for bad in ["42", "order:", "invoice:1"] {
            assert_eq!(refetch_after_resend(&resend(bad), "s", 0), None, "{bad}");
        }
        let refetch = IntegrationCommand { command_type: CommandType::RefetchOrder, ..resend("order:1") };
        assert_eq!(refetch_after_resend(&refetch, "s", 0), None);
    }
}
