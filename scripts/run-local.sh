#!/usr/bin/env bash
# Starts Elo's services against the stack that scripts/stack.sh brought up, shows their health
# until Ctrl-C, then stops them gracefully (SIGTERM: drain, commit, exit) and leaves nothing
# running. Logs go to $ELO_STACK_DATA/logs.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN="${ELO_BIN_DIR:-$ROOT/target/debug}"
LOGS="${ELO_STACK_DATA:-$ROOT/.data}/logs"
mkdir -p "$LOGS"
SERVICES=(order-ingest salesforce-sink rdstation-sink reconciler)
ADMIN_BASE="${ELO_RUN_ADMIN_BASE_PORT:-9101}"
PORTS=("$ADMIN_BASE" $((ADMIN_BASE + 1)) $((ADMIN_BASE + 2)) $((ADMIN_BASE + 3)))
INTERVAL="${ELO_RUN_STATUS_INTERVAL:-5}"
PIDS=()

stop_all() {
  trap - INT TERM EXIT
  echo
  echo "stopping services (drain and commit)..."
  for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 300); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  echo "all services stopped"
}
trap 'stop_all; exit 0' INT TERM
trap stop_all EXIT

# The sandbox simulates Magento, Salesforce and RD Station (no accounts needed locally).
SANDBOX_CONTROL="${ELO_SANDBOX_CONTROL_LISTEN:-127.0.0.1:8700}"
ELO_SANDBOX_INITIAL_ORDERS="${ELO_SANDBOX_INITIAL_ORDERS:-200}" "$BIN/sandbox" >"$LOGS/sandbox.log" 2>&1 &
SANDBOX_PID=$!
PIDS+=($SANDBOX_PID)

for i in "${!SERVICES[@]}"; do
  svc=${SERVICES[$i]}
  ELO_ADMIN_LISTEN="127.0.0.1:${PORTS[$i]}" "$BIN/$svc" >"$LOGS/$svc.log" 2>&1 &
  PIDS+=($!)
done

echo "Elo is starting; logs in $LOGS. Press Ctrl-C to stop."
while true; do
  sleep "$INTERVAL"
  line=""
  if ! kill -0 "$SANDBOX_PID" 2>/dev/null; then
    echo "sandbox exited unexpectedly; last log lines:" >&2
    tail -20 "$LOGS/sandbox.log" >&2
    exit 1
  fi
  code=$(curl -s -o /dev/null -w '%{http_code}' "http://$SANDBOX_CONTROL/health/readyz" || true)
  line+="sandbox=$([[ "$code" == 200 ]] && echo ready || echo "not-ready($code)")  "
  for i in "${!SERVICES[@]}"; do
    svc=${SERVICES[$i]}
    if ! kill -0 "${PIDS[$i]}" 2>/dev/null; then
      echo "$svc exited unexpectedly; last log lines:" >&2
      tail -20 "$LOGS/$svc.log" >&2
      exit 1
    fi
    code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:${PORTS[$i]}/health/readyz" || true)
    state=$([[ "$code" == 200 ]] && echo ready || echo "not-ready($code)")
    line+="$svc=$state  "
  done
  echo "$(date +%H:%M:%S) $line"
done
