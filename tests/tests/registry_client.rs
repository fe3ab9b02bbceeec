//! The local Schema Registry behaves like Confluent's for Confluent's own Python client.

use std::path::Path;
use std::process::Command;

use elo_integration_tests::{registry_url, unique};

#[test]
fn confluent_python_client_works_against_the_local_registry() {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/registry_client.py");
    let out =
        Command::new("python3").arg(script).arg(registry_url()).arg(unique("registry")).output().expect("python3");
    assert!(out.status.success(), "{}\n{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("registry client checks passed"));
}
