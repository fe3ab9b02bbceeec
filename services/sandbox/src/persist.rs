//! Optional persistence: every simulator's data in one JSON file, written atomically (temp
//! file + rename) so a crash never leaves half a state, and loaded at startup.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::magento::{Customer, MagentoApp};
use crate::rdstation::contacts::ContactField;
use crate::rdstation::{Contact, RdStationApp, Segmentation};
use crate::salesforce::SalesforceApp;
use crate::salesforce::model::Org;

/// Everything that survives a restart.
#[derive(Serialize, Deserialize)]
pub struct Snapshot {
    pub salesforce_org: Org,
    pub salesforce_api_usage: u64,
    pub rd_contacts: BTreeMap<String, Contact>,
    pub rd_events: Vec<Value>,
    pub rd_segmentations: Vec<Segmentation>,
    /// Custom contact fields created through the API (absent in older state files).
    #[serde(default)]
    pub rd_fields: Option<Vec<ContactField>>,
    pub magento_orders: BTreeMap<i64, Value>,
    pub magento_customers: BTreeMap<i64, Customer>,
    pub magento_stock: BTreeMap<String, (f64, u8)>,
    #[serde(default)]
    pub magento_reservations: BTreeMap<String, f64>,
    #[serde(default)]
    pub magento_shipped: std::collections::BTreeSet<i64>,
    pub generator_seed: u64,
    pub generator_step: i64,
}

/// Takes a consistent copy of each simulator (one lock at a time).
pub fn snapshot(sf: &SalesforceApp, rd: &RdStationApp, magento: &MagentoApp) -> Snapshot {
    let (salesforce_org, salesforce_api_usage) = {
        let s = sf.sim.lock().expect("sim lock");
        (s.org.clone(), s.api_usage)
    };
    let (rd_contacts, rd_events, rd_segmentations, rd_fields) = {
        let r = rd.sim.lock().expect("rd lock");
        (r.contacts.clone(), r.events.clone(), r.segmentations.clone(), Some(r.fields.clone()))
    };
    let m = magento.sim.lock().expect("magento lock");
    Snapshot {
        salesforce_org,
        salesforce_api_usage,
        rd_contacts,
        rd_events,
        rd_segmentations,
        rd_fields,
        magento_orders: m.orders.clone(),
        magento_customers: m.customers.clone(),
        magento_stock: m.stock.clone(),
        magento_reservations: m.reservations.clone(),
        magento_shipped: m.shipped.clone(),
        generator_seed: m.generator.config.seed,
        generator_step: m.generator.step,
    }
}

/// Writes the snapshot atomically.
pub fn save(path: &Path, snapshot: &Snapshot) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, serde_json::to_vec(snapshot)?)?;
    std::fs::rename(tmp, path)
}

/// Reads a snapshot; `None` when the file does not exist yet.
pub fn load(path: &Path) -> std::io::Result<Option<Snapshot>> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(std::io::Error::other),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e),
    }
}

/// Puts a snapshot back into the simulators. The generator continues from its step with a
/// seed derived from the original and the step, so the continued stream is deterministic too.
pub fn restore(snapshot: Snapshot, sf: &SalesforceApp, rd: &RdStationApp, magento: &MagentoApp) {
    {
        let mut s = sf.sim.lock().expect("sim lock");
        s.org = snapshot.salesforce_org;
        s.api_usage = snapshot.salesforce_api_usage;
        // The settings decide Person Accounts, whatever the saved schema says.
        s.apply_org_settings();
    }
    {
        let mut r = rd.sim.lock().expect("rd lock");
        r.contacts = snapshot.rd_contacts;
        r.events = snapshot.rd_events;
        r.segmentations = snapshot.rd_segmentations;
        if let Some(fields) = snapshot.rd_fields {
            r.fields = fields;
        }
    }
    let mut m = magento.sim.lock().expect("magento lock");
    m.orders = snapshot.magento_orders;
    m.customers = snapshot.magento_customers;
    m.stock = snapshot.magento_stock;
    m.reservations = snapshot.magento_reservations;
    m.shipped = snapshot.magento_shipped;
    let mut config = m.generator.config.clone();
    config.seed = snapshot.generator_seed ^ (snapshot.generator_step as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    let mut generator = crate::magento::generator::Generator::new(config);
    generator.step = snapshot.generator_step;
    m.generator = generator;
}
