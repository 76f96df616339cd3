"""Deployment files refer only to metrics that exist."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml
from prometheus_client import generate_latest

from app import metrics as gateway_metrics
from tests.conftest import ROOT
from worker import metrics as worker_metrics

DEPLOY = ROOT / "deploy"
NAME = re.compile(r"\bloraplex_[a-z0-9_]+")


SUFFIXES = {"histogram": ("_bucket", "_count", "_sum"), "counter": ("_total",), "info": ("_info",)}


def exported_names() -> set[str]:
    """Every series name the gateway and the workers can export (whether or not observed yet)."""
    names = set()
    for registry in (gateway_metrics.REGISTRY, worker_metrics.REGISTRY):
        for family in registry.collect():
            names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
    return names


def test_alert_rules_use_existing_metrics_and_cover_the_essentials() -> None:
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"][0]["rules"]
    exported = exported_names()
    used = {name for rule in rules for name in NAME.findall(rule["expr"])}
    assert used and used <= exported, sorted(used - exported)
    assert {r["alert"] for r in rules} >= {
        "LoraplexHighP99Latency", "LoraplexHighErrorRate", "LoraplexWorkerDown",
        "LoraplexDeviceMemoryNearFull", "LoraplexAdapterLoadFailures", "LoraplexQueueBacklog",
    }


def test_prometheus_config_loads_the_rules_and_scrapes_gateway_and_workers() -> None:
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    assert {job["job_name"] for job in config["scrape_configs"]} == {"loraplex-gateway", "loraplex-worker"}


PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian's prometheus package; .ci/run installs it)"
)


@needs_promtool
def test_promtool_accepts_the_rules_and_the_config() -> None:
    for args in (["check", "rules", "alerts.yml"], ["check", "config", "prometheus.yml"]):
        done = subprocess.run([PROMTOOL, *args], cwd=DEPLOY / "prometheus", capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
def test_promtool_accepts_the_live_metrics(gateway) -> None:  # type: ignore[no-untyped-def]
    tenant = gateway.new_tenant("scraped")
    gateway.client.post("/generate", headers=tenant, json={"prompt": "a b c"})
    worker_text = generate_latest(worker_metrics.REGISTRY).decode()
    merged = gateway_metrics.merge_worker_metrics({"w0": worker_text, "w1": worker_text, "w2": None}).decode()
    assert merged.count("loraplex_worker_adapter_loads_total{") == 4  # 2 outcomes x 2 scraped workers
    for text in (gateway.client.get("/metrics").text, worker_text, merged):
        done = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, text=True)
        assert done.returncode == 0, done.stdout + done.stderr


DASHBOARD = DEPLOY / "grafana" / "dashboards" / "loraplex.json"


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [t["expr"] for p in dashboard["panels"] if p["type"] != "row" for t in p["targets"]]


def test_the_dashboard_is_the_scripts_output() -> None:
    from scripts.make_dashboard import render

    assert DASHBOARD.read_text() == render(), "run: python scripts/make_dashboard.py"


def test_every_dashboard_metric_exists_and_every_metric_is_on_the_dashboard() -> None:
    exported = exported_names()
    used = {name for expr in dashboard_exprs() for name in NAME.findall(expr)}
    assert used <= exported, sorted(used - exported)
    families = {f.name for r in (gateway_metrics.REGISTRY, worker_metrics.REGISTRY) for f in r.collect()}
    shown = {f for f in families if any(f + suffix in used for suffix in ("", "_total", "_bucket", "_sum", "_info"))}
    assert shown == families, sorted(families - shown)


def test_the_dashboard_uses_the_provisioned_datasource() -> None:
    source = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text())
    uid = source["datasources"][0]["uid"]
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert panels and all(p["datasource"]["uid"] == uid for p in panels)
    assert all(t["datasource"]["uid"] == uid for p in panels for t in p["targets"])
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


DOCKER_COMPOSE = shutil.which("docker-compose")
COMPOSE_SERVICES = {"postgres", "redis", "prepare", "worker-0", "worker-1", "gateway", "job-runner", "prometheus",
                    "grafana"}


@pytest.mark.skipif(DOCKER_COMPOSE is None, reason="docker-compose not installed (Debian's; .ci/run installs it)")
def test_docker_compose_accepts_the_file_and_wires_the_services(tmp_path) -> None:  # type: ignore[no-untyped-def]
    def config(**env: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([str(DOCKER_COMPOSE), "-f", str(ROOT / "docker-compose.yml"), "config"], cwd=tmp_path,
                              env={"PATH": "/usr/bin:/bin", **env}, capture_output=True, text=True)

    secrets = {"LORAPLEX_ADMIN_KEY": "k" * 40, "LORAPLEX_WORKER_TOKEN": "t" * 40, "GRAFANA_ADMIN_PASSWORD": "g" * 20}
    for missing in secrets:  # no default for any secret: not the admin key, the worker token, nor Grafana's
        refused = config(**{k: v for k, v in secrets.items() if k != missing})
        assert refused.returncode != 0 and missing in refused.stderr
    done = config(**secrets)
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    for name, service in services.items():  # published on loopback unless LORAPLEX_BIND says otherwise
        assert all(str(p.get("host_ip") if isinstance(p, dict) else p).startswith("127.0.0.1")
                   for p in service.get("ports", [])), name
    assert set(services) == COMPOSE_SERVICES
    workers = [name for name in services if name.startswith("worker-")]
    for name in workers:
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
    gateway_env = services["gateway"]["environment"]
    assert json.loads(gateway_env["LORAPLEX_WORKER_URLS"]) == [f"http://{w}:8100" for w in workers]
    assert gateway_env["LORAPLEX_REDIS_URL"] == "redis://redis:6379/0"  # limits shared by gateway replicas
    for name in workers:  # each worker has the gateway's token and nothing else secret
        env = services[name]["environment"]
        assert env["LORAPLEX_WORKER_TOKEN"] == gateway_env["LORAPLEX_WORKER_TOKEN"]
        assert "LORAPLEX_ADMIN_KEY" not in env and "LORAPLEX_DATABASE_URL" not in env
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]
    targets = {job["job_name"]: job["static_configs"][0]["targets"] for job in scrape}
    assert targets == {"loraplex-gateway": ["gateway:8000"], "loraplex-worker": [f"{w}:8100" for w in workers]}
    mounts = " ".join(services["grafana"]["volumes"] if isinstance(services["grafana"]["volumes"][0], str)
                      else [v["source"] for v in services["grafana"]["volumes"]])
    assert "deploy/grafana/provisioning" in mounts and "deploy/grafana/dashboards" in mounts


def test_dockerfile_runs_as_non_root_with_a_healthcheck_and_a_cpu_variant() -> None:
    text = (ROOT / "Dockerfile").read_text()
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user and user[-1] not in ("root", "0")
    assert re.search(r"^HEALTHCHECK .*\n?.*CMD ", text, re.M)
    assert "ARG DEVICE=cuda" in text and "AS base-cpu" in text and "FROM base-${DEVICE}" in text
    for copied in re.findall(r"^COPY (\S+) ", text, re.M):
        assert (ROOT / copied).exists(), copied
    assert re.search(r'^ENTRYPOINT \["loraplex"\]$', text, re.M)


K8S = DEPLOY / "k8s"
K8S_VERSION = "1.33.0"


def k8s_documents() -> list[dict]:  # type: ignore[type-arg]
    files = sorted(p for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    return [doc for p in files for doc in yaml.safe_load_all(p.read_text()) if doc]


def test_kubernetes_manifests_pass_schema_validation_offline() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    docs = k8s_documents()
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    # The validator does catch a misspelled field.
    broken = json.loads(json.dumps(next(d for d in docs if d["kind"] == "StatefulSet")))
    broken["spec"]["replica"] = broken["spec"].pop("replicas")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)
    listed = yaml.safe_load((K8S / "kustomization.yaml").read_text())["resources"]
    assert sorted(listed) == sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")


def test_kubernetes_workers_get_a_gpu_each_and_the_gateway_knows_them_all() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for d in k8s_documents()}
    workers = docs[("StatefulSet", "loraplex-worker")]
    container = workers["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    urls = json.loads(docs[("ConfigMap", "loraplex-config")]["data"]["LORAPLEX_WORKER_URLS"])
    replicas = workers["spec"]["replicas"]
    assert urls == [f"http://loraplex-worker-{i}.loraplex-worker:8100" for i in range(replicas)]
    for kind, name in (("StatefulSet", "loraplex-worker"), ("Deployment", "loraplex-gateway")):
        pod = docs[(kind, name)]["spec"]["template"]
        assert pod["metadata"]["annotations"]["prometheus.io/scrape"] == "true"
        assert pod["spec"]["securityContext"]["runAsNonRoot"] is True


def test_kubernetes_pods_get_only_the_secrets_they_need_and_only_gateways_reach_workers() -> None:
    docs = {(d["kind"], d["metadata"]["name"]): d for d in k8s_documents()}

    def secrets(kind: str, name: str, container: str = "containers") -> set[str]:
        pod = docs[(kind, name)]["spec"]["template"]["spec"]
        return {ref["secretRef"]["name"] for c in pod[container] for ref in c.get("envFrom", []) if "secretRef" in ref}

    assert secrets("StatefulSet", "loraplex-worker") == {"loraplex-storage", "loraplex-worker-token"}
    assert secrets("Deployment", "loraplex-job-runner") == {"loraplex-database"}
    assert secrets("Deployment", "loraplex-gateway") == {"loraplex-admin", "loraplex-database", "loraplex-storage",
                                                          "loraplex-worker-token"}
    assert all(("Secret", s) in docs for s in secrets("Deployment", "loraplex-gateway"))
    policy = docs[("NetworkPolicy", "loraplex-worker-ingress")]["spec"]
    worker_labels = docs[("StatefulSet", "loraplex-worker")]["spec"]["template"]["metadata"]["labels"]
    gateway_labels = docs[("Deployment", "loraplex-gateway")]["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"] == worker_labels and policy["policyTypes"] == ["Ingress"]
    allowed = [peer.get("podSelector", {}).get("matchLabels") for rule in policy["ingress"] for peer in rule["from"]]
    assert gateway_labels in allowed
    redis_url = docs[("ConfigMap", "loraplex-config")]["data"]["LORAPLEX_REDIS_URL"]
    assert redis_url == "redis://loraplex-redis:6379/0" and ("Service", "loraplex-redis") in docs
