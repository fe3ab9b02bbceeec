//! Registry state.

use std::collections::BTreeMap;
use std::path::PathBuf;

use apache_avro::Schema;
use apache_avro::schema_compatibility::SchemaCompatibility;
use serde::{Deserialize, Serialize};

/// Compatibility levels, as Confluent names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum Compatibility {
    None,
    Backward,
    BackwardTransitive,
    Forward,
    ForwardTransitive,
    Full,
    FullTransitive,
}

impl Compatibility {
    /// (new schema reads old data, old schema reads new data, against all versions)
    fn rules(self) -> (bool, bool, bool) {
        match self {
            Self::None => (false, false, false),
            Self::Backward => (true, false, false),
            Self::BackwardTransitive => (true, false, true),
            Self::Forward => (false, true, false),
            Self::ForwardTransitive => (false, true, true),
            Self::Full => (true, true, false),
            Self::FullTransitive => (true, true, true),
        }
    }
}

/// Registry errors, each with its Confluent error code.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("Subject '{0}' not found.")]
    SubjectNotFound(String),
    #[error("Version {0} not found.")]
    VersionNotFound(String),
    #[error("Schema {0} not found")]
    SchemaNotFound(u32),
    #[error("Schema not found")]
    SchemaNotInSubject,
    #[error("Invalid schema: {0}")]
    InvalidSchema(String),
    #[error(
        "Schema being registered is incompatible with an earlier schema for subject \"{subject}\", details: [{details}]"
    )]
    Incompatible { subject: String, details: String },
    #[error(
        "The specified version '{0}' is not a valid version id. Allowed values are between [1, 2^31-1] and the string \"latest\""
    )]
    InvalidVersion(String),
    #[error("Unsupported schema type {0}; this registry serves AVRO only")]
    UnsupportedType(String),
    #[error("could not persist registry state: {0}")]
    Persist(String),
}

impl StoreError {
    /// Confluent's numeric error code (HTTP status is its first three digits).
    pub fn error_code(&self) -> u32 {
        match self {
            Self::SubjectNotFound(_) => 40401,
            Self::VersionNotFound(_) => 40402,
            Self::SchemaNotFound(_) | Self::SchemaNotInSubject => 40403,
            Self::Incompatible { .. } => 409,
            Self::InvalidSchema(_) | Self::UnsupportedType(_) => 42201,
            Self::InvalidVersion(_) => 42202,
            Self::Persist(_) => 50001,
        }
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
struct Version {
    version: u32,
    id: u32,
    deleted: bool,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct State {
    /// id → schema text as first registered.
    schemas: BTreeMap<u32, String>,
    /// canonical form → id, so identical schemas share an id across subjects.
    #[serde(default)]
    by_canonical: BTreeMap<String, u32>,
    subjects: BTreeMap<String, Vec<Version>>,
    global: Option<Compatibility>,
    subject_config: BTreeMap<String, Compatibility>,
    next_id: u32,
}

/// A registered schema as the API returns it.
#[derive(Clone, Debug, Serialize)]
pub struct Registered {
    pub subject: String,
    pub version: u32,
    pub id: u32,
    pub schema: String,
}

/// The registry.
#[derive(Debug)]
pub struct Store {
    state: State,
    file: Option<PathBuf>,
}

fn parse(schema: &str) -> Result<Schema, StoreError> {
    Schema::parse_str(schema).map_err(|e| StoreError::InvalidSchema(e.to_string()))
}

impl Store {
    /// An in-memory store, or one loaded from (and saved to) `file`.
    pub fn open(file: Option<PathBuf>) -> Result<Self, StoreError> {
        let state = match &file {
            Some(path) if path.exists() => {
                let text = std::fs::read_to_string(path).map_err(|e| StoreError::Persist(e.to_string()))?;
                serde_json::from_str(&text).map_err(|e| StoreError::Persist(e.to_string()))?
            }
            _ => State { next_id: 1, ..State::default() },
        };
        Ok(Self { state, file })
    }

    fn save(&self) -> Result<(), StoreError> {
        let Some(path) = &self.file else {
            return Ok(());
        };
        let tmp = path.with_extension("tmp");
        let text = serde_json::to_string(&self.state).map_err(|e| StoreError::Persist(e.to_string()))?;
        std::fs::write(&tmp, text)
            .and_then(|()| std::fs::rename(&tmp, path))
            .map_err(|e| StoreError::Persist(e.to_string()))
    }

    /// Global compatibility level (default BACKWARD, as Confluent's).
    pub fn global_compatibility(&self) -> Compatibility {
        self.state.global.unwrap_or(Compatibility::Backward)
    }

    /// Subject-level compatibility, if set.
    pub fn subject_compatibility(&self, subject: &str) -> Option<Compatibility> {
        self.state.subject_config.get(subject).copied()
    }

    pub fn set_global_compatibility(&mut self, level: Compatibility) -> Result<(), StoreError> {
        self.state.global = Some(level);
        self.save()
    }

    pub fn set_subject_compatibility(&mut self, subject: &str, level: Compatibility) -> Result<(), StoreError> {
        self.state.subject_config.insert(subject.to_owned(), level);
        self.save()
    }

    pub fn subjects(&self) -> Vec<String> {
        self.state.subjects.iter().filter(|(_, v)| v.iter().any(|v| !v.deleted)).map(|(k, _)| k.clone()).collect()
    }

    fn live_versions(&self, subject: &str) -> Result<Vec<&Version>, StoreError> {
        let versions: Vec<&Version> =
            self.state.subjects.get(subject).map(|v| v.iter().filter(|v| !v.deleted).collect()).unwrap_or_default();
        if versions.is_empty() {
            return Err(StoreError::SubjectNotFound(subject.to_owned()));
        }
        Ok(versions)
    }

    pub fn versions(&self, subject: &str) -> Result<Vec<u32>, StoreError> {
        Ok(self.live_versions(subject)?.iter().map(|v| v.version).collect())
    }

    /// A version by number or `latest`.
    pub fn version(&self, subject: &str, version: &str) -> Result<Registered, StoreError> {
        let versions = self.live_versions(subject)?;
        let found = if version == "latest" || version == "-1" {
            versions.last().copied()
        } else {
            let n: u32 = version
                .parse()
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(|| StoreError::InvalidVersion(version.to_owned()))?;
            versions.iter().copied().find(|v| v.version == n)
        };
        let v = found.ok_or_else(|| StoreError::VersionNotFound(version.to_owned()))?;
        Ok(Registered {
            subject: subject.to_owned(),
            version: v.version,
            id: v.id,
            schema: self.state.schemas[&v.id].clone(),
        })
    }

    pub fn schema_by_id(&self, id: u32) -> Result<&str, StoreError> {
        self.state.schemas.get(&id).map(String::as_str).ok_or(StoreError::SchemaNotFound(id))
    }

    /// Subject/version pairs using schema `id`.
    pub fn id_usages(&self, id: u32) -> Result<Vec<(String, u32)>, StoreError> {
        self.schema_by_id(id)?;
        Ok(self
            .state
            .subjects
            .iter()
            .flat_map(|(s, vs)| vs.iter().filter(|v| v.id == id && !v.deleted).map(|v| (s.clone(), v.version)))
            .collect())
    }

    /// Finds `schema` among a subject's versions.
    pub fn lookup(&self, subject: &str, schema: &str) -> Result<Registered, StoreError> {
        let canonical = parse(schema)?.canonical_form();
        let versions = self.live_versions(subject)?;
        let id = self.state.by_canonical.get(&canonical).ok_or(StoreError::SchemaNotInSubject)?;
        let v = versions.iter().find(|v| v.id == *id).ok_or(StoreError::SchemaNotInSubject)?;
        Ok(Registered {
            subject: subject.to_owned(),
            version: v.version,
            id: v.id,
            schema: self.state.schemas[&v.id].clone(),
        })
    }

    /// Checks `schema` against the subject's versions under its compatibility level, returning
    /// the reasons it fails (empty when compatible). `against` limits the check to one version.
    pub fn check(&self, subject: &str, schema: &str, against: Option<&str>) -> Result<Vec<String>, StoreError> {
        let new = parse(schema)?;
        let level = self.subject_compatibility(subject).unwrap_or_else(|| self.global_compatibility());
        let (backward, forward, transitive) = level.rules();
        let existing: Vec<u32> = match (self.live_versions(subject), against) {
            (Err(_), _) => return Ok(Vec::new()),
            (Ok(_), Some(v)) => vec![self.version(subject, v)?.id],
            (Ok(vs), None) if transitive => vs.iter().map(|v| v.id).collect(),
            (Ok(vs), None) => vs.last().map(|v| vec![v.id]).unwrap_or_default(),
        };
        let mut problems = Vec::new();
        for id in existing {
            let old = parse(&self.state.schemas[&id])?;
            if backward && let Err(e) = SchemaCompatibility::can_read(&old, &new) {
                problems.push(format!("new schema cannot read data written with schema id {id}: {e}"));
            }
            if forward && let Err(e) = SchemaCompatibility::can_read(&new, &old) {
                problems.push(format!("schema id {id} cannot read data written with the new schema: {e}"));
            }
        }
        Ok(problems)
    }

    /// Registers `schema` under `subject` (idempotent: an existing identical version is
    /// returned as is) after the compatibility check.
    pub fn register(&mut self, subject: &str, schema: &str) -> Result<Registered, StoreError> {
        if let Ok(existing) = self.lookup(subject, schema) {
            return Ok(existing);
        }
        let problems = self.check(subject, schema, None)?;
        if !problems.is_empty() {
            return Err(StoreError::Incompatible { subject: subject.to_owned(), details: problems.join("; ") });
        }
        let canonical = parse(schema)?.canonical_form();
        let id = match self.state.by_canonical.get(&canonical) {
            Some(id) => *id,
            None => {
                let id = self.state.next_id.max(1);
                self.state.next_id = id + 1;
                self.state.schemas.insert(id, schema.to_owned());
                self.state.by_canonical.insert(canonical, id);
                id
            }
        };
        let versions = self.state.subjects.entry(subject.to_owned()).or_default();
        let version = versions.iter().map(|v| v.version).max().unwrap_or(0) + 1;
        versions.push(Version { version, id, deleted: false });
        self.save()?;
        Ok(Registered { subject: subject.to_owned(), version, id, schema: self.state.schemas[&id].clone() })
    }

    /// Soft-deletes a subject; returns the versions deleted.
    pub fn delete_subject(&mut self, subject: &str) -> Result<Vec<u32>, StoreError> {
        let deleted = self.versions(subject)?;
        if let Some(vs) = self.state.subjects.get_mut(subject) {
            vs.iter_mut().for_each(|v| v.deleted = true);
        }
        self.save()?;
        Ok(deleted)
    }

    /// Soft-deletes one version.
    pub fn delete_version(&mut self, subject: &str, version: &str) -> Result<u32, StoreError> {
        let n = self.version(subject, version)?.version;
        if let Some(v) = self.state.subjects.get_mut(subject).and_then(|vs| vs.iter_mut().find(|v| v.version == n)) {
            v.deleted = true;
        }
        self.save()?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V1: &str = r#"{"type":"record","name":"R","fields":[{"name":"a","type":"string"}]}"#;
    const V2_COMPATIBLE: &str = r#"{"type":"record","name":"R","fields":[{"name":"a","type":"string"},{"name":"b","type":["null","long"],"default":null}]}"#;
    const V2_BREAKING: &str =
        r#"{"type":"record","name":"R","fields":[{"name":"a","type":"string"},{"name":"c","type":"long"}]}"#;

    #[test]
    fn registration_is_idempotent_and_ids_are_shared() {
        let mut store = Store::open(None).unwrap();
        let a = store.register("t-value", V1).unwrap();
        assert_eq!((a.id, a.version), (1, 1));
        assert_eq!(store.register("t-value", V1).unwrap().version, 1);
        let b = store.register("u-value", V1).unwrap();
        assert_eq!(b.id, a.id, "identical schemas share an id");
        assert_eq!(store.register("t-value", V2_COMPATIBLE).unwrap().version, 2);
    }

    #[test]
    fn incompatible_change_is_refused_with_409() {
        let mut store = Store::open(None).unwrap();
        store.register("t-value", V1).unwrap();
        let err = store.register("t-value", V2_BREAKING).unwrap_err();
        assert_eq!(err.error_code(), 409);
        store.set_subject_compatibility("t-value", Compatibility::None).unwrap();
        assert!(store.register("t-value", V2_BREAKING).is_ok());
    }

    #[test]
    fn state_survives_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("registry.json");
        let id = Store::open(Some(path.clone())).unwrap().register("t-value", V1).unwrap().id;
        let store = Store::open(Some(path)).unwrap();
        assert_eq!(store.version("t-value", "latest").unwrap().id, id);
        assert_eq!(store.schema_by_id(id).unwrap(), V1);
    }

    #[test]
    fn errors_carry_confluent_codes() {
        let mut store = Store::open(None).unwrap();
        assert_eq!(store.version("nope", "1").unwrap_err().error_code(), 40401);
        store.register("t-value", V1).unwrap();
        assert_eq!(store.version("t-value", "9").unwrap_err().error_code(), 40402);
        assert_eq!(store.version("t-value", "x").unwrap_err().error_code(), 42202);
        assert_eq!(store.schema_by_id(99).unwrap_err().error_code(), 40403);
        assert_eq!(store.register("t-value", "{not json").unwrap_err().error_code(), 42201);
    }
}
