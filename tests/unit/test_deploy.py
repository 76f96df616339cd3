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
NAME = re.compile(r"\bloraplex_[a-z_]+")


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
