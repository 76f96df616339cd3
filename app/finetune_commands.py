"""`loraplex finetune FILE --follow` and the fine-tuning half of `loraplex jobs`: a tenant's key, over HTTP."""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from app.admin_commands import _checked

FINISHED = ("succeeded", "failed", "cancelled")


def tenant_key(args: argparse.Namespace) -> str | None:
    return getattr(args, "api_key", None) or os.environ.get("LORAPLEX_API_KEY")


@contextmanager
def _tenant_client(args: argparse.Namespace) -> Iterator[Any]:
    import httpx

    key = tenant_key(args)
    if not key:
        sys.exit("no API key: pass --api-key or set LORAPLEX_API_KEY (a tenant's key)")
    with httpx.Client(base_url=args.url, headers={"Authorization": f"Bearer {key}"}, timeout=120) as client:
        try:
            yield client
        except httpx.TransportError as exc:
            sys.exit(f"cannot reach the gateway at {args.url}: {exc}")


def _upload(client: Any, path: str) -> str:
    with open(path, "rb") as f:
        uploaded = _checked(client.post("/v1/files", files={"file": (Path(path).name, f)},
                                        data={"purpose": "fine-tune"}))
    print(f"{path}: {uploaded['examples']} examples, uploaded as {uploaded['id']}")
    return str(uploaded["id"])


def cmd_finetune(args: argparse.Namespace) -> None:
    with _tenant_client(args) as client:
        model = args.model or _checked(client.get("/v1/models"))["data"][0]["id"]
        body: dict[str, Any] = {"model": model, "training_file": _upload(client, args.file)}
        if args.validation_file:
            body["validation_file"] = _upload(client, args.validation_file)
        hyper = {k: v for k, v in (("n_epochs", args.epochs), ("batch_size", args.batch_size),
                                   ("learning_rate_multiplier", args.lr_multiplier)) if v is not None}
        if hyper:
            body["hyperparameters"] = hyper
        if args.suffix:
            body["suffix"] = args.suffix
        if args.seed is not None:
            body["seed"] = args.seed
        job = _checked(client.post("/v1/fine_tuning/jobs", json=body))
        hp = job["hyperparameters"]
        print(f"job {job['id']} queued: {hp['n_epochs']} epochs, batch {hp['batch_size']}, "
              f"learning rate x{hp['learning_rate_multiplier']} on {model}")
        if args.follow:
            job = follow(client, job["id"])
            print_result(job)


def follow(client: Any, job_id: str) -> dict[str, Any]:
    """A progress bar with the latest training loss, until the job ends."""
    loss = ""
    while True:
        job: dict[str, Any] = _checked(client.get(f"/v1/fine_tuning/jobs/{job_id}"))
        events = _checked(client.get(f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": 5}))["data"]
        latest = next((e["data"] for e in events if e["type"] == "metrics" and e.get("data")), None)
        if latest is not None:
            loss = f"loss {latest['train_loss']:.4f}"
        done, total = job["progress"]["done"], job["progress"]["total"]
        filled = int(30 * done / total) if total else 0
        print(f"\r[{'#' * filled}{'.' * (30 - filled)}] {job['status']:<16} {done}/{total} {loss:<12}",
              end="", flush=True)
        if job["status"] in FINISHED:
            print()
            return job
        time.sleep(2)


def print_result(job: dict[str, Any]) -> None:
    if job["error"]:
        print(f"failed: {job['error']['message']}")
        return
    if job["status"] != "succeeded":
        print(f"job {job['id']} {job['status']}")
        return
    report = job.get("report") or {}
    losses = report.get("train_loss") or []
    if losses:
        print(f"training loss {losses[0]:.3f} -> {losses[-1]:.3f} over {len(losses)} steps, "
              f"{report.get('trained_tokens')} tokens in {report.get('duration_seconds')} s")
    valid = report.get("validation_loss") or {}
    if valid.get("before") is not None:
        print(f"validation loss {valid['before']:.3f} -> {valid['after']:.3f}")
    probe = report.get("probe") or {}
    if probe:
        print(f"base answer:       {probe.get('base_answer')!r}\nfine-tuned answer: {probe.get('result_answer')!r}")
    print(f"model: {job['fine_tuned_model']}")


def list_finetune_jobs(args: argparse.Namespace) -> None:
    with _tenant_client(args) as client:
        for job in _checked(client.get("/v1/fine_tuning/jobs", params={"limit": 100}))["data"]:
            progress = f"{job['progress']['done']}/{job['progress']['total']}"
            print(f"{job['id']}  {job['status']:<16} {progress:>7}  {job['model']} -> {job['fine_tuned_model'] or '-'}"
                  + (f"  error: {job['error']['message']}" if job["error"] else ""))
