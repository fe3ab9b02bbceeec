#!/usr/bin/env bash
# Starts the local infrastructure (Tansu broker with sqlite storage, the local Schema
# Registry), runs a command with their addresses in the environment, and stops them again,
# whatever the command's outcome. Used by `make test` and `make bench` (throwaway data) and
# `make run` (`.data`).
#
#   scripts/stack.sh [--data DIR] [--keep] -- COMMAND...
#
# Addresses (overridable): ELO_STACK_KAFKA_PORT (9092), ELO_STACK_REGISTRY_PORT (8081).
# Throwaway data (without --data) goes under ELO_STACK_DATA_PARENT (default: $TMPDIR or /tmp).
# ELO_STACK_STORAGE picks Tansu's storage engine (default sqlite://tansu.db, which survives a
# restart; memory://tansu/ keeps nothing and costs the broker far less CPU: an experiment knob).
# The command sees ELO_KAFKA_BROKERS / ELO_REGISTRY_URL and, for tests, ELO_TEST_BROKERS /
# ELO_TEST_REGISTRY.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
TOOLS_DIR="${ELO_TOOLS_DIR:-$HOME/.cache/elo/tools}"
TANSU_BIN="${ELO_TANSU_BIN:-$TOOLS_DIR/tansu/bin/tansu}"
KAFKA_PORT="${ELO_STACK_KAFKA_PORT:-9092}"
REGISTRY_PORT="${ELO_STACK_REGISTRY_PORT:-8081}"
DATA=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --data) DATA="$2"; shift 2 ;;
    --) shift; break ;;
    *) echo "usage: $0 [--data DIR] -- COMMAND..." >&2; exit 2 ;;
  esac
done
[[ $# -gt 0 ]] || { echo "usage: $0 [--data DIR] -- COMMAND..." >&2; exit 2; }

if [[ -z "$DATA" ]]; then
  # ELO_STACK_DATA_PARENT: where the throwaway data folder goes (`make bench` puts it on tmpfs:
  # on a disk Tansu's acknowledgements had a longer tail; Kafka acknowledges from the page cache).
  DATA="$(mktemp -d "${ELO_STACK_DATA_PARENT:-${TMPDIR:-/tmp}}/elo-stack-XXXXXX")"
  CLEAN_DATA=1
else
  mkdir -p "$DATA"
  CLEAN_DATA=0
fi
DATA="$(cd "$DATA" && pwd)"

PIDS=()
cleanup() {
  local status=$?
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  [[ "$CLEAN_DATA" == 1 ]] && rm -rf "$DATA"
  exit "$status"
}
trap cleanup EXIT
# Ctrl-C reaches the command too; its exit status decides ours.
trap ':' INT
trap 'exit 143' TERM

wait_port() {
  local port=$1 name=$2
  for _ in $(seq 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    sleep 0.1
  done
  echo "$name did not open port $port; see $DATA/$name.log" >&2
  tail -20 "$DATA/$name.log" >&2 || true
  return 1
}

for port in "$KAFKA_PORT" "$REGISTRY_PORT"; do
  if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "port $port is already in use; stop what runs there or set ELO_STACK_KAFKA_PORT / ELO_STACK_REGISTRY_PORT" >&2
    exit 1
  fi
done

[[ -x "$TANSU_BIN" ]] || { echo "tansu not found at $TANSU_BIN: run scripts/install-tools.sh" >&2; exit 1; }
mkdir -p "$DATA/tansu"
# setsid: the terminal's Ctrl-C reaches the command only; cleanup below sends one SIGTERM.
( cd "$DATA/tansu" && exec setsid "$TANSU_BIN" broker \
    --listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$KAFKA_PORT" \
    --storage-engine "${ELO_STACK_STORAGE:-sqlite://tansu.db}" ) >"$DATA/tansu.log" 2>&1 &
PIDS+=($!)
wait_port "$KAFKA_PORT" tansu

# The registry cargo built (debug profile), wherever CARGO_TARGET_DIR puts builds.
REGISTRY_BIN="${ELO_REGISTRY_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/debug/schema-registry}"
setsid "$REGISTRY_BIN" --listen "127.0.0.1:$REGISTRY_PORT" --admin-listen 127.0.0.1:0 \
  --data-file "$DATA/registry.json" >"$DATA/schema-registry.log" 2>&1 &
PIDS+=($!)
wait_port "$REGISTRY_PORT" schema-registry

export ELO_KAFKA_BROKERS="127.0.0.1:$KAFKA_PORT" ELO_REGISTRY_URL="http://127.0.0.1:$REGISTRY_PORT"
export ELO_TEST_BROKERS="$ELO_KAFKA_BROKERS" ELO_TEST_REGISTRY="$ELO_REGISTRY_URL" ELO_STACK_DATA="$DATA"
# Tansu 0.6 wedges (a storage panic poisons its lock) when an idempotent producer bumps its
# epoch after a record timed out during an outage: on this stack, producers run without
# idempotence (order kept by one request in flight). See tests/tests/tansu_known_issues.rs.
export ELO_KAFKA_IDEMPOTENCE="${ELO_KAFKA_IDEMPOTENCE:-false}"
echo "stack up: kafka $ELO_KAFKA_BROKERS, registry $ELO_REGISTRY_URL, data $DATA"
"$@"
