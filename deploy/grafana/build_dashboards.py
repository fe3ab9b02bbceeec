"""Writes Elo's Grafana dashboards to deploy/base/dashboards/*.json (provisioned by the
configMapGenerator in deploy/base/kustomization.yaml, label grafana_dashboard=1, which Grafana's
dashboard sidecar picks up). Edit this file, run it, commit both; the `dashboards` check of
tests/python/deploy_checks.py fails when the JSON is not what this script writes.

Every expression uses only metrics the services export today (checked by
tests/tests/deploy_metrics.rs against their live /metrics), plus `kafka_consumergroup_lag`
(Strimzi's Kafka Exporter) and `ALERTS` (Prometheus). Panels that need metrics the sinks and the
reconciler do not export yet are text panels saying what they wait for.
"""

import json
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "base/dashboards"
DS = {"type": "prometheus", "uid": "${datasource}"}
NS = 'namespace="$namespace"'


class Board:
    def __init__(self, uid, title, description):
        self.uid, self.title, self.description = uid, title, description
        self.panels, self.y, self.x, self.row_h = [], 0, 0, 0

    def _place(self, w, h):
        if self.x + w > 24:
            self.y, self.x, self.row_h = self.y + self.row_h, 0, 0
        pos = {"h": h, "w": w, "x": self.x, "y": self.y}
        self.x += w
        self.row_h = max(self.row_h, h)
        return pos

    def row(self, title):
        self.y, self.x, self.row_h = self.y + self.row_h, 0, 0
        self.panels.append({"id": len(self.panels) + 1, "type": "row", "title": title, "collapsed": False,
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": []})
        self.y += 1

    def graph(self, title, targets, unit="short", w=8, h=8, kind="timeseries", description=""):
        panel = {
            "id": len(self.panels) + 1,
            "type": kind,
            "title": title,
            "description": description,
            "datasource": DS,
            "gridPos": self._place(w, h),
            "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
            "options": {},
            "targets": [
                {"refId": chr(ord("A") + i), "datasource": DS, "expr": expr, "legendFormat": legend}
                for i, (expr, legend) in enumerate(targets)
            ],
        }
        if kind == "table":
            panel["targets"][0]["format"] = "table"
            panel["targets"][0]["instant"] = True
        self.panels.append(panel)

    def text(self, title, content, w=8, h=8):
        self.panels.append({"id": len(self.panels) + 1, "type": "text", "title": title, "gridPos": self._place(w, h),
                            "options": {"mode": "markdown", "content": content}})

    def json(self):
        return {
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": ["elo"],
            "timezone": "utc",
            "editable": False,
            "schemaVersion": 39,
            "version": 1,
            "refresh": "30s",
            "time": {"from": "now-6h", "to": "now"},
            "templating": {"list": [
                {"name": "datasource", "type": "datasource", "query": "prometheus", "label": "Data source"},
                {"name": "namespace", "type": "query", "datasource": DS, "label": "Namespace",
                 "query": {"query": "label_values(elo_build_info, namespace)", "refId": "ns"}, "refresh": 2},
            ]},
            "annotations": {"list": []},
            "links": [{"title": "Elo", "type": "dashboards", "tags": ["elo"], "asDropdown": True}],
            "panels": self.panels,
        }


def rate(metric, selector, by, window="$__rate_interval"):
    return f"sum by ({by}) (rate({metric}{{{NS}{', ' + selector if selector else ''}}}[{window}]))"


def consumer_panels(b, job):
    sel = f'job="{job}"'
    b.graph("Records finished", [(rate("elo_consumer_records_total", sel, "topic, outcome"), "{{topic}} {{outcome}}")], "ops")
    b.graph("Consumer lag", [(f'sum by (topic) (kafka_consumergroup_lag{{{NS}, consumergroup="elo-{job}"}})', "{{topic}}")],
            "short", description="From Strimzi's Kafka Exporter; KEDA scales on the same lag.")
    b.graph("Handler errors by class", [(rate("elo_consumer_handler_errors_total", sel, "error_type, error_code"), "{{error_type}} {{error_code}}")], "ops")
    b.graph("Batch duration p99", [(f"histogram_quantile(0.99, {rate('elo_consumer_batch_duration_seconds_bucket', sel, 'le, topic')})", "{{topic}}")], "s")
    b.graph("Partitions", [
        (f'sum by (topic) (elo_consumer_assigned_partitions{{{NS}, {sel}}})', "assigned {{topic}}"),
        (f'sum by (topic) (elo_consumer_paused_partitions{{{NS}, {sel}}})', "paused {{topic}}"),
        (f'sum by (topic) (elo_consumer_halted_partitions{{{NS}, {sel}}})', "halted {{topic}}"),
        (f'sum by (topic) (elo_consumer_dlq_blocked_partitions{{{NS}, {sel}}})', "DLQ blocked {{topic}}"),
    ])
    b.graph("Partitions waiting to retry", [(f'sum by (error_type) (elo_consumer_retrying_partitions{{{NS}, {sel}}})', "{{error_type}}")])
    b.graph("Rebalances and commit errors", [
        (rate("elo_consumer_rebalances_total", sel, "kind", "5m"), "rebalance {{kind}}"),
        (rate("elo_consumer_commit_errors_total", sel, "mode", "5m"), "commit error {{mode}}"),
    ], "ops")
    if job == "salesforce-sink":
        # Only salesforce-sink counts what it decoded by type (the business view reads it too).
        b.graph("Events decoded, by type", [(rate("elo_validated_events_total", sel, "topic, event_type"), "{{topic}} {{event_type}}")], "ops")


def producer_panels(b, job):
    sel = f'job="{job}"'
    b.graph("Records produced", [(rate("elo_kafka_produced_records_total", sel, "topic"), "{{topic}}")], "ops")
    b.graph("Produce errors", [(rate("elo_kafka_produce_errors_total", sel, "topic, error_code"), "{{topic}} {{error_code}}")], "ops")
    b.graph("Produce latency p99", [(f"histogram_quantile(0.99, {rate('elo_kafka_produce_latency_seconds_bucket', sel, 'le, topic')})", "{{topic}}")], "s")
    b.graph("Kafka client errors", [(rate("elo_kafka_client_errors_total", sel, "client, error_code", "5m"), "{{client}} {{error_code}}")], "ops")
    b.graph("Where sends wait, p99 of the last window", [
        (f'max by (broker) (elo_kafka_producer_queue_wait_seconds{{{NS}, {sel}, client="kafka_producer", stat="p99"}})', "producer queue, broker {{broker}}"),
        (f'max by (broker) (elo_kafka_broker_rtt_seconds{{{NS}, {sel}, client="kafka_producer", stat="p99"}})', "broker round trip, broker {{broker}}"),
    ], "s", description="librdkafka's statistics (every ELO_KAFKA_STATISTICS_INTERVAL_MS, 30 s by default like the scrape; scrape at least as often or windows are missed): time in the producer's queue until a request takes a record, and the broker's round trip. A queue wait far over the round trip means requests take turns on the connection.")


def versions(b, w=24):
    b.graph("Versions running", [(f"sum by (service, version) (elo_build_info{{{NS}}})", "{{service}} {{version}}")], kind="table", w=w, h=6)


def pipeline():
    b = Board("elo-pipeline", "Elo / Pipeline overview", "The six workflow steps of architecture.md, left to right.")
    b.row("1. Order received in Magento (order-ingest)")
    b.graph("Webhooks by outcome", [(rate("order_ingest_notifications_total", 'job="order-ingest"', "outcome"), "{{outcome}}")], "reqps")
    b.graph("Poll behind Magento", [(f'max by (entity, store) (order_ingest_poll_lag_seconds{{{NS}}})', "{{entity}} store {{store}}")], "s")
    b.graph("Events published", [(rate("elo_kafka_produced_records_total", 'job="order-ingest"', "topic"), "{{topic}}")], "ops")
    b.row("2. Inventory checked (order-ingest)")
    b.graph("Stock checks by outcome", [(rate("order_ingest_inventory_checks_total", "", "outcome"), "{{outcome}}")], "ops", w=12)
    b.graph("Magento errors", [(rate("order_ingest_magento_errors_total", "", "class"), "{{class}}")], "ops", w=12)
    for step, job in (("3. CRM updated (salesforce-sink)", "salesforce-sink"), ("4. Marketing segmentation (rdstation-sink)", "rdstation-sink")):
        b.row(step)
        b.graph("Records finished", [(rate("elo_consumer_records_total", f'job="{job}"', "outcome"), "{{outcome}}")], "ops")
        b.graph("Consumer lag", [(f'sum(kafka_consumergroup_lag{{{NS}, consumergroup="elo-{job}"}})', "lag")])
        b.graph("Waiting to retry", [(f'sum by (error_type) (elo_consumer_retrying_partitions{{{NS}, job="{job}"}})', "{{error_type}}")])
    b.row("5. Monitoring and correction (reconciler, every service)")
    b.graph("Dead letters", [(rate("elo_consumer_records_total", 'outcome="dead_lettered"', "job, topic", "5m"), "{{job}} {{topic}}")], "ops")
    b.graph("Handler errors by class", [(rate("elo_consumer_handler_errors_total", "", "job, error_type", "5m"), "{{job}} {{error_type}}")], "ops")
    b.graph("Repair commands", [(rate("order_ingest_commands_total", "", "outcome", "5m"), "{{outcome}}")], "ops")
    b.row("6. Reports and feedback")
    b.graph("Elo alerts firing", [(f'sum by (alertname, severity) (ALERTS{{{NS}, alertname=~"Elo.*", alertstate="firing"}})', "{{alertname}} ({{severity}})")], w=12)
    versions(b, w=12)
    return b


def order_ingest():
    b = Board("elo-order-ingest", "Elo / order-ingest", "Magento push and poll, stock checks, repair commands.")
    b.row("Push")
    b.graph("Webhooks by outcome", [(rate("order_ingest_notifications_total", "", "outcome"), "{{outcome}}")], "reqps")
    b.graph("Webhook to acknowledged event p99", [(f"histogram_quantile(0.99, {rate('order_ingest_publish_latency_seconds_bucket', '', 'le')})", "p99")], "s")
    b.graph("Magento REST errors", [(rate("order_ingest_magento_errors_total", "", "class"), "{{class}}")], "ops")
    b.row("Poll, stock and commands")
    b.graph("Poll behind Magento", [(f'max by (entity, store) (order_ingest_poll_lag_seconds{{{NS}}})', "{{entity}} store {{store}}")], "s")
    b.graph("Polled records that became dead letters", [(rate("order_ingest_poll_invalid_total", "", "entity", "5m"), "{{entity}}")], "ops")
    b.graph("Stock checks", [(rate("order_ingest_inventory_checks_total", "", "outcome"), "{{outcome}}")], "ops")
    b.graph("Repair commands", [(rate("order_ingest_commands_total", "", "outcome", "5m"), "{{outcome}}")], "ops")
    b.row("Kafka")
    producer_panels(b, "order-ingest")
    versions(b)
    return b


def consumer_board(job, what):
    b = Board(f"elo-{job}", f"Elo / {job}", what)
    b.row("Consumer")
    consumer_panels(b, job)
    b.row("Kafka (dead letters)")
    producer_panels(b, job)
    versions(b)
    return b


def business():
    b = Board("elo-business", "Elo / Business view", "Orders, customers and what reached the CRM and marketing.")
    b.row("Orders")
    orders = 'job="salesforce-sink", topic="commerce.events", event_type=~"ORDER_PLACED|ORDER_CHANGED"'
    b.graph("Orders in the last 24 h", [(f"sum by (event_type) (increase(elo_validated_events_total{{{NS}, {orders}}}[24h]))", "{{event_type}}")], kind="stat")
    b.graph("Orders per hour", [(f"sum by (event_type) (increase(elo_validated_events_total{{{NS}, {orders}}}[1h]))", "{{event_type}}")])
    b.graph("Customers changed and erased per hour", [(
        f'sum by (event_type) (increase(elo_validated_events_total{{{NS}, job="salesforce-sink", event_type=~"CUSTOMER_.*"}}[1h]))', "{{event_type}}")])
    b.row("Synced")
    b.text("Revenue synced to Salesforce",
           "**Pending**: needs salesforce-sink's applied orders with their totals "
           "(`elo_sink_revenue_synced_total{currency}`), which the service does not export yet.")
    b.text("Segments in RD Station",
           "**Pending**: needs rdstation-sink's segmentation outcome "
           "(`rdstation_sink_contacts_by_segment{segment}`), which the service does not export yet.")
    b.graph("Records applied or parked per sink (last 24 h)", [(
        f"sum by (job, outcome) (increase(elo_consumer_records_total{{{NS}, topic=\"commerce.events\"}}[24h]))", "{{job}} {{outcome}}")], kind="bargauge")
    return b


def boards():
    return [
        pipeline(),
        order_ingest(),
        consumer_board("salesforce-sink", "Commerce events to Salesforce: accounts, contacts and orders upserted, outcomes reported."),
        consumer_board("rdstation-sink", "Commerce events to RD Station Marketing: contacts, legal bases, segmentation tags and e-commerce events."),
        consumer_board("reconciler", "Ledger of commerce events and sink outcomes: sweeps, drift, repairs and reports."),
        business(),
    ]


def render():
    return {f"{b.uid}.json": json.dumps(b.json(), indent=1, sort_keys=True) + "\n" for b in boards()}


if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    for name, text in render().items():
        (OUT / name).write_text(text)
        print(OUT / name)
