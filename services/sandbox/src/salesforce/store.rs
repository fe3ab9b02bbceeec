//! The org's record store, kept the way a database keeps a table: records by Id, an index on
//! every stored scalar field ((object, field) → lower-cased value → ids) so lookups by external
//! id, duplicate rules and child lookups cost what they find rather than the size of the org,
//! and an undo log so an all-or-none request rolls back what it touched instead of copying
//! the org before every Composite Graph. Read access derefs to the records map; every write
//! goes through [`RecordStore::put`] / [`RecordStore::take`], which keep the index and the log.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::ops::Deref;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::Value;

use serde_json::Map;

use super::model::{Org, SfRecord};

/// Index: (object, field) → indexed text → ids.
type Index = HashMap<(String, String), HashMap<String, BTreeSet<String>>>;

/// Records by Id, indexed, with an undo log while a transaction is open.
#[derive(Clone, Debug, Default)]
pub struct RecordStore {
    records: BTreeMap<String, SfRecord>,
    index: Index,
    /// (id, the record before the change) per change since the outermost savepoint.
    undo: Option<Vec<(String, Option<SfRecord>)>>,
}

/// A point to roll back to (see [`RecordStore::savepoint`]).
#[derive(Debug)]
pub struct Savepoint {
    mark: usize,
    outer: bool,
}

/// The text a stored scalar is indexed under: strings lower-cased (Salesforce matches external
/// ids ignoring case unless the field says otherwise; callers re-check exactly), numbers as written.
pub fn index_text(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.to_lowercase()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

impl Deref for RecordStore {
    type Target = BTreeMap<String, SfRecord>;
    fn deref(&self) -> &Self::Target {
        &self.records
    }
}

impl Serialize for RecordStore {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        self.records.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for RecordStore {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let records = BTreeMap::<String, SfRecord>::deserialize(deserializer)?;
        let mut store = Self::default();
        for (_, record) in records {
            store.put(record);
        }
        Ok(store)
    }
}

impl RecordStore {
    fn index_add(index: &mut Index, record: &SfRecord) {
        for (field, value) in &record.fields {
            if let Some(text) = index_text(value) {
                let by_value = index.entry((record.object.clone(), field.clone())).or_default();
                by_value.entry(text).or_default().insert(record.id.clone());
            }
        }
    }

    fn index_remove(index: &mut Index, record: &SfRecord) {
        for (field, value) in &record.fields {
            let Some(text) = index_text(value) else { continue };
            let Some(by_value) = index.get_mut(&(record.object.clone(), field.clone())) else { continue };
            if let Some(ids) = by_value.get_mut(&text) {
                ids.remove(&record.id);
                if ids.is_empty() {
                    by_value.remove(&text);
                }
            }
        }
    }

    /// Records of `object` whose stored `field` is indexed under `text` (see [`index_text`]),
    /// in Id order. Callers apply the exact comparison.
    pub fn candidates<'a>(&'a self, object: &str, field: &str, text: &str) -> impl Iterator<Item = &'a SfRecord> + 'a {
        self.index
            .get(&(object.to_owned(), field.to_owned()))
            .and_then(|by_value| by_value.get(text))
            .into_iter()
            .flatten()
            .filter_map(|id| self.records.get(id))
    }

    /// Inserts or replaces a record.
    pub fn put(&mut self, record: SfRecord) {
        let previous = self.records.remove(&record.id);
        if let Some(previous) = &previous {
            Self::index_remove(&mut self.index, previous);
        }
        Self::index_add(&mut self.index, &record);
        if let Some(undo) = self.undo.as_mut() {
            undo.push((record.id.clone(), previous));
        }
        self.records.insert(record.id.clone(), record);
    }

    /// Removes a record.
    pub fn take(&mut self, id: &str) -> Option<SfRecord> {
        let record = self.records.remove(id)?;
        Self::index_remove(&mut self.index, &record);
        if let Some(undo) = self.undo.as_mut() {
            undo.push((id.to_owned(), Some(record.clone())));
        }
        Some(record)
    }

    /// Opens a transaction (or a nested savepoint in an open one).
    pub fn savepoint(&mut self) -> Savepoint {
        let outer = self.undo.is_none();
        let undo = self.undo.get_or_insert_with(Vec::new);
        Savepoint { mark: undo.len(), outer }
    }

    /// Keeps the changes since `savepoint`.
    pub fn release(&mut self, savepoint: Savepoint) {
        if savepoint.outer {
            self.undo = None;
        }
    }

    /// Undoes the changes since `savepoint`, newest first.
    pub fn rollback(&mut self, savepoint: Savepoint) {
        let mut undo = self.undo.take().unwrap_or_default();
        while undo.len() > savepoint.mark {
            let Some((id, previous)) = undo.pop() else { break };
            if let Some(current) = self.records.remove(&id) {
                Self::index_remove(&mut self.index, &current);
            }
            if let Some(previous) = previous {
                Self::index_add(&mut self.index, &previous);
                self.records.insert(id, previous);
            }
        }
        if !savepoint.outer {
            self.undo = Some(undo);
        }
    }
}

/// A point an all-or-none request rolls back to.
#[derive(Debug)]
pub struct OrgSavepoint {
    store: Savepoint,
    next_id: u64,
}

/// Transactions and drift on the org, through the store.
impl Org {
    /// Opens an all-or-none transaction (nested ones are savepoints).
    pub fn savepoint(&mut self) -> OrgSavepoint {
        OrgSavepoint { store: self.records.savepoint(), next_id: self.next_id }
    }

    /// Keeps what was written since `savepoint`.
    pub fn release(&mut self, savepoint: OrgSavepoint) {
        self.records.release(savepoint.store);
    }

    /// Undoes what was written since `savepoint`.
    pub fn rollback(&mut self, savepoint: OrgSavepoint) {
        self.records.rollback(savepoint.store);
        self.next_id = savepoint.next_id;
    }

    /// Replaces a stored record (no validation: the caller already checked).
    pub(super) fn replace(&mut self, record: SfRecord) {
        self.records.put(record);
    }

    /// Drift: a record removed behind the integration's back (no rules apply).
    pub fn remove_record(&mut self, id: &str) -> Option<SfRecord> {
        self.records.take(id)
    }

    /// Drift: fields changed behind the integration's back (no validation, as an admin's data
    /// fix would be). Returns the changed record.
    pub fn alter(&mut self, id: &str, fields: &Map<String, Value>, now: i64) -> Option<&SfRecord> {
        let mut record = self.records.get(id)?.clone();
        record.fields.extend(fields.iter().map(|(k, v)| (k.clone(), v.clone())));
        record.modified_ms = now;
        self.records.put(record);
        self.records.get(id)
    }

    /// Records of `object` whose stored `field` equals `text` ignoring case (index lookup).
    pub(super) fn matching<'a>(
        &'a self,
        object: &str,
        field: &str,
        text: &str,
    ) -> impl Iterator<Item = &'a SfRecord> + 'a {
        let wanted = text.to_owned();
        self.records
            .candidates(object, field, &text.to_lowercase())
            .filter(move |r| {
                r.fields.get(field).and_then(Value::as_str).is_some_and(|v| v.eq_ignore_ascii_case(&wanted))
            })
            .collect::<Vec<_>>()
            .into_iter()
    }
}

#[cfg(test)]
mod tests {
    use serde_json::{Map, json};

    use super::*;

    fn record(id: &str, object: &str, fields: Value) -> SfRecord {
        let fields: Map<String, Value> = fields.as_object().cloned().unwrap_or_default();
        SfRecord { id: id.into(), object: object.into(), fields, created_ms: 0, modified_ms: 0 }
    }

    #[test]
    fn the_index_follows_writes_and_rollbacks() {
        let mut store = RecordStore::default();
        store.put(record("001A", "Account", json!({"Elo_Id__c": "C:1", "Name": "Ana"})));
        let find = |s: &RecordStore, v: &str| {
            s.candidates("Account", "Elo_Id__c", v).map(|r| r.id.clone()).collect::<Vec<_>>()
        };
        assert_eq!(find(&store, "c:1"), vec!["001A"]);
        let outer = store.savepoint();
        store.put(record("001A", "Account", json!({"Elo_Id__c": "c:2", "Name": "Ana"})));
        store.put(record("001B", "Account", json!({"Elo_Id__c": "c:3"})));
        let inner = store.savepoint();
        store.take("001B");
        assert!(find(&store, "c:3").is_empty());
        store.rollback(inner);
        assert_eq!(find(&store, "c:3"), vec!["001B"], "the nested rollback undid only its own change");
        assert_eq!(find(&store, "c:2"), vec!["001A"]);
        assert!(find(&store, "c:1").is_empty());
        store.rollback(outer);
        assert_eq!(find(&store, "c:1"), vec!["001A"]);
        assert!(find(&store, "c:2").is_empty() && find(&store, "c:3").is_empty());
        assert_eq!(store.len(), 1);
        // Serialised and read back: the index is rebuilt.
        let back: RecordStore = serde_json::from_value(serde_json::to_value(&store).unwrap()).unwrap();
        assert_eq!(find(&back, "c:1"), vec!["001A"]);
    }
}
