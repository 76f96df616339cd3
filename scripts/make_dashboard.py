"""Write deploy/grafana/dashboards/loraplex.json: the ops dashboard, one panel list in Python.

Run `python scripts/make_dashboard.py` after changing a panel; tests/unit/test_deploy.py checks that
the committed JSON is this script's output and that every metric it names is exported.
"""

from __future__ import annotations

import json
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "deploy" / "grafana" / "dashboards" / "loraplex.json"
DATASOURCE = {"type": "prometheus", "uid": "loraplex-prometheus"}  # provisioned in deploy/grafana/provisioning
RATE = "$__rate_interval"
API = 'route!~"/health/.*|/metrics.*"'  # readiness probes answer 503 while starting: not API errors


def quantiles(metric: str, by: str = "") -> list[tuple[str, str]]:
    """p50 and p99 of a histogram, optionally split by a label."""
    group = f"le, {by}" if by else "le"
    suffix = f" {{{{{by}}}}}" if by else ""
    return [(f"histogram_quantile({q}, sum by ({group}) (rate({metric}_bucket[{RATE}])))", f"p{int(q * 100)}{suffix}")
            for q in (0.5, 0.99)]


# (row title, [(panel title, unit, [(expr, legend)])])
ROWS: list[tuple[str, list[tuple[str, str, list[tuple[str, str]]]]]] = [
    ("Traffic", [
        ("Requests by route and outcome", "reqps", [
            (f"sum by (route, outcome) (rate(loraplex_http_requests_total[{RATE}]))", "{{route}} {{outcome}}")]),
        ("API error ratio (5xx)", "percentunit", [
            (f'(sum(rate(loraplex_http_requests_total{{{API}, outcome=~"error|unavailable"}}[{RATE}])) or vector(0))'
             f" / sum(rate(loraplex_http_requests_total{{{API}}}[{RATE}]))", "errors")]),
        ("429s and 503s", "reqps", [
            (f'sum by (outcome) (rate(loraplex_http_requests_total{{{API}, outcome=~"rate_limited|unavailable"}}'
             f"[{RATE}]))",
             "{{outcome}}")]),
        ("In flight and ready workers", "short", [
            ("sum(loraplex_in_flight_requests)", "in flight"), ("max(loraplex_workers_ready)", "ready workers")]),
        ("Tokens per second", "short", [
            (f"sum(rate(loraplex_prompt_tokens_total[{RATE}]))", "prompt"),
            (f"sum(rate(loraplex_completion_tokens_total[{RATE}]))", "completion")]),
        ("Fail-overs to another worker", "reqps", [
            (f"sum(rate(loraplex_failover_retries_total[{RATE}]))", "retries")]),
        ("Quantization jobs by state", "short", [("max by (state) (loraplex_quantization_jobs)", "{{state}}")]),
        ("Fine-tuning jobs by state", "short", [("max by (state) (loraplex_finetune_jobs)", "{{state}}")]),
        ("Fine-tuning: tokens trained, job duration", "short", [
            ("max(loraplex_finetune_trained_tokens)", "tokens trained (succeeded jobs)"),
            ("histogram_quantile(0.5, max by (le) (loraplex_finetune_job_duration_seconds_bucket))",
             "job duration p50 (s)")]),
    ]),
    ("Latency", [
        ("End-to-end latency", "s", quantiles("loraplex_request_duration_seconds", "route")),
        ("Time to first token", "s", quantiles("loraplex_time_to_first_token_seconds")),
        ("Inter-token latency", "s", quantiles("loraplex_inter_token_latency_seconds")),
        ("Queue time", "s", quantiles("loraplex_queue_duration_seconds")),
    ]),
    ("Tenants (the busiest N by name, the rest as other)", [
        ("Tenant latency p99", "s", [
            (f"histogram_quantile(0.99, sum by (le, tenant) (rate(loraplex_tenant_request_duration_seconds_bucket"
             f"[{RATE}])))", "{{tenant}}")]),
        ("Tenant tokens per second", "short", [
            (f"sum by (tenant, kind) (rate(loraplex_tenant_tokens_total[{RATE}]))", "{{tenant}} {{kind}}")]),
    ]),
    ("Workers", [
        ("Running and waiting requests", "short", [
            ("sum by (instance) (loraplex_worker_running_requests)", "{{instance}} running"),
            ("sum by (instance) (loraplex_worker_waiting_requests)", "{{instance}} waiting")]),
        ("Worker up, live and ready", "short", [
            ('up{job="loraplex-worker"}', "{{instance}} up"),
            ("loraplex_worker_live", "{{instance}} live"),
            ("loraplex_worker_ready", "{{instance}} ready")]),
        ("Engine heartbeat age", "s", [("loraplex_worker_engine_heartbeat_age_seconds", "{{instance}}")]),
        ("Workers restarted by the gateway", "ops", [
            (f"sum by (reason) (rate(loraplex_worker_restarts_total[{RATE}]))", "{{reason}}")]),
        ("Requests accepted per second", "reqps", [
            (f"sum by (instance) (rate(loraplex_worker_requests_total[{RATE}]))", "{{instance}}")]),
        ("Mean decode batch size", "short", [
            (f"sum by (instance) (rate(loraplex_worker_batch_size_sum[{RATE}]))"
             f" / sum by (instance) (rate(loraplex_worker_batch_size_count[{RATE}]))", "{{instance}}")]),
        ("Step time by phase", "s", quantiles("loraplex_worker_step_duration_seconds", "phase")),
        ("Worker queue time", "s", quantiles("loraplex_worker_queue_duration_seconds")),
        ("Worker tokens per second", "short", [
            (f"sum by (instance) (rate(loraplex_worker_generated_tokens_total[{RATE}]))", "{{instance}} generated"),
            (f"sum by (instance) (rate(loraplex_worker_prompt_tokens_total[{RATE}]))", "{{instance}} prompt")]),
        ("Memory by kind", "bytes", [("loraplex_worker_memory_bytes", "{{instance}} {{kind}}")]),
        ("KV cache positions", "short", [
            ("loraplex_worker_kv_cache_tokens", "{{instance}} {{state}}")]),
        ("KV cache reserved", "percentunit", [
            ('loraplex_worker_kv_cache_tokens{state="reserved"}'
             ' / ignoring(state) loraplex_worker_kv_cache_tokens{state="capacity"}', "{{instance}}")]),
        ("Device memory used", "percentunit", [
            ('loraplex_worker_memory_bytes{kind="device_used"}'
             ' / ignoring(kind) loraplex_worker_memory_bytes{kind="device_total"}', "{{instance}}")]),
        ("Base model", "none", [("loraplex_worker_base_model_info", "{{instance}} {{model}} {{quantization}}")]),
    ]),
    ("Adapter cache", [
        ("Resident adapters by tier", "short", [
            ("sum by (tier) (loraplex_worker_adapters_resident)", "{{tier}}")]),
        ("Adapter bytes by tier", "bytes", [("sum by (tier) (loraplex_worker_adapter_bytes)", "{{tier}}")]),
        ("Lookups by result", "ops", [
            (f"sum by (result) (rate(loraplex_worker_adapter_lookups_total[{RATE}]))", "{{result}}")]),
        ("Routed to a worker holding the adapter", "percentunit", [
            (f'sum(rate(loraplex_adapter_routes_total{{outcome="resident"}}[{RATE}]))'
             f" / sum(rate(loraplex_adapter_routes_total[{RATE}]))", "resident ratio")]),
        ("Device hit ratio", "percentunit", [
            (f'sum(rate(loraplex_worker_adapter_lookups_total{{result="hit"}}[{RATE}]))'
             f" / sum(rate(loraplex_worker_adapter_lookups_total[{RATE}]))", "hit ratio")]),
        ("Loads by outcome", "ops", [
            (f"sum by (outcome) (rate(loraplex_worker_adapter_loads_total[{RATE}]))", "{{outcome}}")]),
        ("Evictions by tier and reason", "ops", [
            (f"sum by (tier, reason) (rate(loraplex_worker_adapter_evictions_total[{RATE}]))",
             "{{tier}} {{reason}}")]),
        ("Load latency (store to host; host to slot, which stalls the batch)", "s",
         quantiles("loraplex_worker_adapter_load_duration_seconds")
         + [(expr, f"slot fill {legend}")
            for expr, legend in quantiles("loraplex_worker_adapter_slot_fill_duration_seconds")]),
        # Counts, not quantiles: a worker on other slot dtypes has none, and a quantile of nothing is NaN.
        ("int8 slot fills by rounding loss (refused above LORA_INT8_MAX_ERROR)", "short", [
            (f"sum by (le) (increase(loraplex_worker_adapter_int8_rounding_ratio_bucket[{RATE}]))",
             "lost at most {{le}}")]),
    ]),
]


def build() -> dict[str, object]:
    panels: list[dict[str, object]] = []
    panel_id = 0
    y = 0
    for row_title, row_panels in ROWS:
        panel_id += 1
        panels.append({"id": panel_id, "type": "row", "title": row_title, "collapsed": False,
                       "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": []})
        y += 1
        for i, (title, unit, targets) in enumerate(row_panels):
            panel_id += 1
            table = title == "Base model"
            panels.append({
                "id": panel_id,
                "type": "table" if table else "timeseries",
                "title": title,
                "datasource": DATASOURCE,
                "gridPos": {"h": 8, "w": 8, "x": (i % 3) * 8, "y": y + (i // 3) * 8},
                "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
                "targets": [
                    {"refId": chr(ord("A") + k), "datasource": DATASOURCE, "expr": expr, "legendFormat": legend,
                     **({"instant": True, "format": "table"} if table else {})}
                    for k, (expr, legend) in enumerate(targets)
                ],
            })
        y += ((len(row_panels) + 2) // 3) * 8
    return {
        "uid": "loraplex-overview",
        "title": "loraplex",
        "tags": ["loraplex", "llm", "lora"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "templating": {"list": []},
        "annotations": {"list": []},
        "panels": panels,
    }


def render() -> str:
    return json.dumps(build(), indent=2) + "\n"


if __name__ == "__main__":
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(render())
    print(f"wrote {OUT}")
