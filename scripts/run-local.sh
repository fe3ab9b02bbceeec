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

# Webhook signing secret shared by the sandbox's Magento and order-ingest (kept in the data dir).
SECRET_FILE="${ELO_STACK_DATA:-$ROOT/.data}/webhook-secret"
[[ -s "$SECRET_FILE" ]] || (umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$SECRET_FILE")
export ELO_ORDER_INGEST_WEBHOOK_SECRET_FILE="$SECRET_FILE"
INGEST_LISTEN="${ELO_ORDER_INGEST_LISTEN:-127.0.0.1:8080}"
export ELO_ORDER_INGEST_LISTEN="$INGEST_LISTEN"
export ELO_MAGENTO_URL="${ELO_MAGENTO_URL:-http://${ELO_SANDBOX_MAGENTO_LISTEN:-127.0.0.1:8701}}"
export ELO_SALESFORCE_LOGIN_URL="${ELO_SALESFORCE_LOGIN_URL:-http://${ELO_SANDBOX_SALESFORCE_LISTEN:-127.0.0.1:8702}}"
export ELO_RDSTATION_URL="${ELO_RDSTATION_URL:-http://${ELO_SANDBOX_RDSTATION_LISTEN:-127.0.0.1:8703}}"
# Locally (no secret files, loopback RD) the sink gets its authorization code from the sandbox.
export ELO_RDSTATION_SANDBOX_CONTROL="${ELO_RDSTATION_SANDBOX_CONTROL:-http://${ELO_SANDBOX_CONTROL_LISTEN:-127.0.0.1:8700}}"
# The sandbox's RD account starts with the run: no earlier process spent its budget.
export ELO_RDSTATION_START_HOLD="${ELO_RDSTATION_START_HOLD:-0s}"

# The reconciler serves the daily report and the live flow diagram, and asks the other
# services' admin ports for their health and counts.
RECONCILER_HTTP="${ELO_RECONCILER_HTTP_LISTEN:-127.0.0.1:9180}"
export ELO_RECONCILER_HTTP_LISTEN="$RECONCILER_HTTP"
export ELO_RECONCILER_SERVICE_ADMIN="${ELO_RECONCILER_SERVICE_ADMIN:-order-ingest=http://127.0.0.1:${PORTS[0]},salesforce-sink=http://127.0.0.1:${PORTS[1]},rdstation-sink=http://127.0.0.1:${PORTS[2]},reconciler=http://127.0.0.1:${PORTS[3]}}"

# The sandbox simulates Magento, Salesforce and RD Station (no accounts needed locally).
SANDBOX_CONTROL="${ELO_SANDBOX_CONTROL_LISTEN:-127.0.0.1:8700}"
# Each process gets its own session (setsid): Ctrl-C reaches this script only, which then
# sends every process exactly one SIGTERM (a second signal would skip the drain).
ELO_SANDBOX_INITIAL_ORDERS="${ELO_SANDBOX_INITIAL_ORDERS:-200}" setsid "$BIN/sandbox" >"$LOGS/sandbox.log" 2>&1 &
SANDBOX_PID=$!
PIDS+=($SANDBOX_PID)

for i in "${!SERVICES[@]}"; do
  svc=${SERVICES[$i]}
  ELO_ADMIN_LISTEN="127.0.0.1:${PORTS[$i]}" setsid "$BIN/$svc" >"$LOGS/$svc.log" 2>&1 &
  PIDS+=($!)
done

echo "Elo is starting; logs in $LOGS. Press Ctrl-C to stop."
echo "Daily report: http://$RECONCILER_HTTP/report  Live flow diagram: http://$RECONCILER_HTTP/flow"
WIRED=0
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
  # Once everything is up: Magento pushes signed order webhooks to order-ingest and the
  # generator places orders, so events flow through Kafka to the consumer services.
  if [[ $WIRED == 0 && "$line" != *not-ready* ]]; then
    secret=$(cat "$SECRET_FILE")
    curl -s -o /dev/null -X PUT "http://$SANDBOX_CONTROL/magento/webhook" -H 'content-type: application/json' \
      -d "{\"url\": \"http://$INGEST_LISTEN/webhooks/magento/orders\", \"customer_url\": \"http://$INGEST_LISTEN/webhooks/magento/customers\", \"secret\": \"$secret\", \"duplicate_rate\": 0.05, \"style\": \"cloud_events\"}"
    curl -s -o /dev/null -X PUT "http://$SANDBOX_CONTROL/magento/generator" -H 'content-type: application/json' \
      -d "{\"rate_per_sec\": ${ELO_RUN_ORDERS_PER_SECOND:-2}}"
    WIRED=1
  fi
  sink=$(curl -s "http://127.0.0.1:${PORTS[1]}/metrics")
  events=$(awk '/^elo_validated_events_total/ && !/event_type="none"/ {s+=$2} END {print s+0}' <<<"$sink")
  orders=$(awk '/^salesforce_sink_records_total/ && /object="Order"/ && /result="applied"/ {s+=$2} END {print s+0}' <<<"$sink")
  ingest=$(curl -s "http://127.0.0.1:${PORTS[0]}/metrics")
  pushed=$(awk '/^order_ingest_notifications_total/ && /outcome="published"/ {s+=$2} END {print s+0}' <<<"$ingest")
  stock=$(awk '/^order_ingest_inventory_checks_total/ && /outcome="fetched"/ {s+=$2} END {print s+0}' <<<"$ingest")
  # Per-step counts from the reconciler's flow diagram (order inventory salesforce rdstation
  # repair report; `-` while a service does not answer).
  steps=$(curl -s --max-time 3 "http://$RECONCILER_HTTP/api/flow?format=line" || true)
  echo "$(date +%H:%M:%S) $line notifications-published=$pushed stock-checks=$stock events-validated-by-salesforce-sink=$events orders-in-salesforce=$orders steps: ${steps:-unavailable}"
done
