//! What order-ingest reads from Magento, as a seam: the REST client in production
//! ([`crate::wiring::MagentoSource`]), the sandbox's state in process in unit tests.

use std::sync::Arc;

use elo_events::Decimal4;
use serde_json::Value;

/// Why a read from Magento failed, classified for the caller: a missing entity is final, an
/// outage is worth retrying, anything else (a refused request, a body that is not what the
/// API documents) will not get better by retrying.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SourceError {
    #[error("not found in Magento")]
    NotFound,
    #[error("Magento temporarily unavailable: {0}")]
    Unavailable(String),
    #[error("Magento refused the request: {0}")]
    Refused(String),
}

impl SourceError {
    /// Bounded label for metrics and DLQ codes.
    pub fn class(&self) -> &'static str {
        match self {
            Self::NotFound => "not_found",
            Self::Unavailable(_) => "unavailable",
            Self::Refused(_) => "refused",
        }
    }
}

/// Single-entity reads used by push refetches, enrichment and repair commands.
pub trait MagentoApi: Send + Sync + 'static {
    /// `GET /V1/orders/{id}`.
    fn order(&self, entity_id: i64) -> impl Future<Output = Result<Value, SourceError>> + Send;
    /// `GET /V1/customers/{id}`.
    fn customer(&self, customer_id: i64) -> impl Future<Output = Result<Value, SourceError>> + Send;
    /// `GET /V1/inventory/get-product-salable-quantity/{sku}/{stockId}`; `None` when Magento
    /// does not know the SKU (not stock-managed, e.g. a bundle's own SKU).
    fn salable_qty(
        &self,
        sku: &str,
        stock_id: i32,
    ) -> impl Future<Output = Result<Option<Decimal4>, SourceError>> + Send;
}

impl<T: MagentoApi> MagentoApi for Arc<T> {
    fn order(&self, entity_id: i64) -> impl Future<Output = Result<Value, SourceError>> + Send {
        (**self).order(entity_id)
    }
    fn customer(&self, customer_id: i64) -> impl Future<Output = Result<Value, SourceError>> + Send {
        (**self).customer(customer_id)
    }
    fn salable_qty(
        &self,
        sku: &str,
        stock_id: i32,
    ) -> impl Future<Output = Result<Option<Decimal4>, SourceError>> + Send {
        (**self).salable_qty(sku, stock_id)
    }
}

/// An in-process Magento over the sandbox's state, for unit tests of every path.
#[cfg(test)]
pub(crate) mod fake {
    use std::sync::{Arc, Mutex};

    use super::*;

    #[derive(Clone)]
    pub(crate) struct Shop(pub(crate) Arc<Mutex<sandbox::magento::Magento>>);

    impl Shop {
        pub(crate) fn generated(orders: usize) -> Self {
            let mut magento = sandbox::magento::Magento::new(Default::default(), Default::default());
            magento.generate(orders);
            Self(Arc::new(Mutex::new(magento)))
        }
    }

    impl MagentoApi for Shop {
        async fn order(&self, entity_id: i64) -> Result<Value, SourceError> {
            self.0.lock().unwrap().orders.get(&entity_id).cloned().ok_or(SourceError::NotFound)
        }
        async fn customer(&self, customer_id: i64) -> Result<Value, SourceError> {
            let m = self.0.lock().unwrap();
            m.customers.get(&customer_id).map(|c| c.to_json()).ok_or(SourceError::NotFound)
        }
        async fn salable_qty(&self, sku: &str, _stock_id: i32) -> Result<Option<Decimal4>, SourceError> {
            let m = self.0.lock().unwrap();
            Ok(m.stock.get(sku).map(|(q, _)| Decimal4::parse(&q.to_string()).expect("sandbox quantities are decimals")))
        }
    }
}
