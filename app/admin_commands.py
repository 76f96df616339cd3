"""`loraplex quantize`, `jobs` and `base-models`: the admin API over HTTP, for a terminal."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from app.settings import Settings


@contextmanager
def _admin_client(args: argparse.Namespace) -> Iterator[Any]:
    """An HTTP client with the admin key; an unreachable gateway is a one-line error, not a traceback."""
    import httpx

    key = args.admin_key or os.environ.get("LORAPLEX_ADMIN_KEY")
    if not key:
        key_file = Settings().data_dir / "admin_key"
        if not key_file.exists():
            sys.exit("no admin key: pass --admin-key or set LORAPLEX_ADMIN_KEY")
        key = key_file.read_text().strip()
    with httpx.Client(base_url=args.url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
        try:
            yield client
        except httpx.TransportError as exc:
            sys.exit(f"cannot reach the gateway at {args.url}: {exc}")


def _checked(response: Any) -> Any:
    if response.status_code >= 400:
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = response.text
        sys.exit(f"error {response.status_code}: {message}")
    return response.json()


def cmd_quantize(args: argparse.Namespace) -> None:
    body = {"name": args.name, "source_model": args.source, "method": args.method, "bits": args.bits,
            "sym": not args.asymmetric, "group_size": args.group_size,
            "calibration_samples": args.samples, "calibration_seq_len": args.seq_len}
    if args.calibration_file:
        body["calibration_text"] = Path(args.calibration_file).read_text()
    with _admin_client(args) as client:
        job = _checked(client.post("/admin/quantization-jobs", json=body))
        print(f"job {job['id']} queued: {args.method} of {args.source} -> {args.name}")
        if args.follow:
            job = _follow(client, job["id"])
            _print_report(client, job)


def _follow(client: Any, job_id: int) -> dict[str, Any]:
    while True:
        job: dict[str, Any] = _checked(client.get(f"/admin/quantization-jobs/{job_id}"))
        done, total = job["progress"]["done"], job["progress"]["total"]
        filled = int(30 * done / total) if total else 0
        line = f"\r[{'#' * filled}{'.' * (30 - filled)}] {job['state']:<9} {job['stage'] or '':<12} {done}/{total}"
        print(line, end="", flush=True)
        if job["state"] in ("succeeded", "failed", "cancelled"):
            print()
            if job["error"]:
                print(f"error: {job['error']}")
            return job
        time.sleep(1)


def _print_report(client: Any, job: dict[str, Any]) -> None:
    if job["result_model_id"] is None:
        return
    models = _checked(client.get("/admin/base-models"))
    model = next(m for m in models if m["id"] == job["result_model_id"])
    _print_models([model])


def _print_models(models: list[dict[str, Any]]) -> None:
    print(f"{'id':>3}  {'name':<28} {'quant':<8} {'active':<6} {'ppl before':>10} {'ppl after':>9} "
          f"{'MB before':>9} {'MB after':>8} {'seconds':>7}")
    for m in models:
        r = m["report"] or {}
        src, res = r.get("source", {}), r.get("result", {})

        def num(d: dict[str, Any], key: str, scale: float = 1.0) -> str:
            return f"{d[key] / scale:.1f}" if key in d else "-"

        print(f"{m['id']:>3}  {m['name']:<28} {m['quantization']:<8} {'yes' if m['active'] else '':<6} "
              f"{num(src, 'perplexity'):>10} {num(res, 'perplexity'):>9} {num(src, 'size_bytes', 2**20):>9} "
              f"{num(res, 'size_bytes', 2**20):>8} {r.get('duration_seconds', '-'):>7}")
        if r.get("probe_prompt"):
            print(f"     probe {r['probe_prompt']!r}\n       before: {src.get('probe_answer')!r}"
                  f"\n       after:  {res.get('probe_answer')!r}")


def cmd_jobs(args: argparse.Namespace) -> None:
    """Fine-tuning jobs with a tenant's key (--api-key, LORAPLEX_API_KEY); quantization jobs with the admin key."""
    from app.finetune_commands import list_finetune_jobs, tenant_key

    if tenant_key(args):
        list_finetune_jobs(args)
        if not (args.admin_key or os.environ.get("LORAPLEX_ADMIN_KEY")):
            return
    with _admin_client(args) as client:
        for job in _checked(client.get("/admin/quantization-jobs")):
            progress = f"{job['progress']['done']}/{job['progress']['total']}"
            print(f"{job['id']:>4}  {job['state']:<9} {job['stage'] or '':<12} {progress:>7}  "
                  f"{job['spec']['method']} {job['spec']['bits']}-bit g{job['spec']['group_size']} -> {job['name']}"
                  + (f"  error: {job['error']}" if job["error"] else ""))


def cmd_base_models(args: argparse.Namespace) -> None:
    with _admin_client(args) as client:
        _print_models(_checked(client.get("/admin/base-models")))
