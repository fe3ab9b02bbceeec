#!/usr/bin/env bash
# Installs what Elo needs outside the Rust workspace, once per machine:
#   - the Tansu broker, built from crates.io into a tools folder outside the checkout
#     (ELO_TOOLS_DIR, default ~/.cache/elo/tools) so every clone reuses it;
#   - Python packages for the cross-implementation tests (fastavro, confluent-kafka).
# Safe to run again: each step checks first.
set -euo pipefail

TOOLS_DIR="${ELO_TOOLS_DIR:-$HOME/.cache/elo/tools}"
TANSU_VERSION="${ELO_TANSU_VERSION:-0.6.0}"
TANSU_BIN="$TOOLS_DIR/tansu/bin/tansu"

if [[ -x "$TANSU_BIN" ]] && "$TANSU_BIN" --version 2>/dev/null | grep -q "$TANSU_VERSION"; then
  echo "tansu $TANSU_VERSION: $TANSU_BIN"
else
  echo "installing tansu $TANSU_VERSION into $TOOLS_DIR/tansu (takes several minutes, once)"
  mkdir -p "$TOOLS_DIR"
  cargo install tansu --version "$TANSU_VERSION" --locked --features libsql,dynostore --root "$TOOLS_DIR/tansu"
fi

if [[ "${1:-}" == "--with-python" ]]; then
  if python3 -c 'import fastavro, confluent_kafka.schema_registry.avro, simple_salesforce, magento.clients, rdstation.client' 2>/dev/null; then
    echo "python test packages present"
  else
    python3 -m pip install --quiet --disable-pip-version-check -r "$(dirname "$0")/../tests/python/requirements.txt"
  fi
fi
