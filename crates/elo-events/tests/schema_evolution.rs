//! Every schema in `schemas/` stays FULL-compatible with its previous committed version:
//! new readers read old data and old readers read new data, so producers and consumers can be
//! upgraded in any order. "Previous" is HEAD's version when the file has uncommitted changes,
//! otherwise the version before the last commit that changed it.

use std::path::{Path, PathBuf};
use std::process::Command;

use apache_avro::Schema;
use apache_avro::schema_compatibility::SchemaCompatibility;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().unwrap()
}

fn git(args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(repo_root())
        .args(args)
        .output()
        .expect("git must be installed to check schema evolution");
    out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn previous_committed(path: &str) -> Option<(String, String)> {
    assert!(
        git(&["rev-parse", "--git-dir"]).is_some(),
        "schema evolution is checked against git history; run from a clone"
    );
    let changed_since_head = git(&["diff", "--quiet", "HEAD", "--", path]).is_none();
    let commits: Vec<String> =
        git(&["log", "--format=%H", "--", path]).unwrap_or_default().lines().map(str::to_owned).collect();
    let base = if changed_since_head { commits.first()?.clone() } else { commits.get(1)?.clone() };
    git(&["show", &format!("{base}:{path}")]).map(|text| (base, text))
}

/// Problems that break FULL compatibility (empty = compatible).
fn full_compatibility_problems(old: &Schema, new: &Schema) -> Vec<String> {
    let mut problems = Vec::new();
    if let Err(e) = SchemaCompatibility::can_read(old, new) {
        problems.push(format!("the new schema cannot read old data: {e}"));
    }
    if let Err(e) = SchemaCompatibility::can_read(new, old) {
        problems.push(format!("old readers cannot read new data: {e}"));
    }
    problems
}

#[test]
fn every_schema_is_full_compatible_with_its_previous_committed_version() {
    let mut compared = 0;
    for (topic, current) in elo_events::schema::ALL {
        let path = format!("schemas/{topic}.avsc");
        let new = Schema::parse_str(current).unwrap_or_else(|e| panic!("{path}: {e}"));
        let Some((commit, previous)) = previous_committed(&path) else {
            println!("{path}: first version, nothing to compare with");
            continue;
        };
        let old = Schema::parse_str(&previous).unwrap_or_else(|e| panic!("{path} at {commit}: {e}"));
        let problems = full_compatibility_problems(&old, &new);
        assert!(problems.is_empty(), "{path} is not FULL-compatible with its version at {commit}: {problems:?}");
        println!("{path}: FULL-compatible with {commit}");
        compared += 1;
    }
    println!("{compared} schemas compared with their previous versions");
}

#[test]
fn the_check_catches_breaking_changes() {
    let base: serde_json::Value = serde_json::from_str(elo_events::schema::COMMERCE_EVENT_AVSC).unwrap();
    let old = Schema::parse(&base).unwrap();

    // Adding an optional field with a default: fine both ways.
    let mut added = base.clone();
    added["fields"]
        .as_array_mut()
        .unwrap()
        .push(serde_json::json!({"name": "channel", "type": ["null", "string"], "default": null}));
    assert!(full_compatibility_problems(&old, &Schema::parse(&added).unwrap()).is_empty());

    // Adding a required field: new readers cannot read old data.
    let mut required = base.clone();
    required["fields"].as_array_mut().unwrap().push(serde_json::json!({"name": "channel", "type": "string"}));
    assert!(!full_compatibility_problems(&old, &Schema::parse(&required).unwrap()).is_empty());

    // Removing a field without a default: old readers cannot read new data.
    let mut removed = base.clone();
    removed["fields"].as_array_mut().unwrap().retain(|f| f["name"] != "customer_key");
    assert!(!full_compatibility_problems(&old, &Schema::parse(&removed).unwrap()).is_empty());

    // Changing a type.
    let mut retyped = base;
    let field = retyped["fields"].as_array_mut().unwrap().iter_mut().find(|f| f["name"] == "source_system").unwrap();
    field["type"] = serde_json::json!("long");
    assert!(!full_compatibility_problems(&old, &Schema::parse(&retyped).unwrap()).is_empty());
}
