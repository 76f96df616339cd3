"""The `loraplex` command: serve, worker, models prepare.

Commands that need torch (worker, models) import it lazily, so `serve` stays torch-free:
it runs `models prepare` in a child process when no base model is registered yet.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

from sqlalchemy import select

from adapters.bases import ActiveBase, BaseCheckpoints
from adapters.db import make_engine, make_sessionmaker
from adapters.models import BaseCheckpoint
from app.settings import Settings
from worker.config import WorkerConfig


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    return Settings(**overrides)


def _active_base(settings: Settings) -> ActiveBase | None:
    return BaseCheckpoints(make_sessionmaker(make_engine(settings.resolved_database_url))).active_or_none()


class _QuietProbes(logging.Filter):
    """Keep health checks and Prometheus scrapes (every few seconds) out of the access log."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        path = str(args[2]) if len(args) > 2 else ""
        return not path.startswith(("/health/", "/metrics"))


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    from app.main import build_app
    from app.workers.supervisor import SupervisedProcess

    settings = _settings(args)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if settings.workers and _active_base(settings) is None:
        print("preparing the embedded base model (first start only)...", flush=True)
        subprocess.run([sys.executable, "-m", "app.cli", "models", "prepare"], env=_settings_env(settings), check=True)
    runner = SupervisedProcess("job runner", lambda: _start_job_runner(settings)) if settings.job_runner else None
    app = build_app(settings)
    admin_key = app.state.services.admin_key
    print(f"loraplex gateway listening on http://{settings.host}:{settings.port}", flush=True)
    if settings.admin_key is None:
        print(f"admin key (development mode, kept in {settings.data_dir / 'admin_key'}): {admin_key}", flush=True)
    logging.getLogger("uvicorn.access").addFilter(_QuietProbes())
    try:
        uvicorn.run(app, host=settings.host, port=settings.port, log_level="info", timeout_graceful_shutdown=30)
    finally:
        if runner is not None:
            runner.stop()


def _settings_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a child process these settings (some may have come from flags)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "LORAPLEX_DATA_DIR": str(settings.data_dir)}
    if settings.models_dir:
        env["LORAPLEX_MODELS_DIR"] = str(settings.models_dir)
    if settings.database_url:
        env["LORAPLEX_DATABASE_URL"] = settings.database_url
    return env


def _start_job_runner(settings: Settings) -> subprocess.Popen[bytes]:
    from app.workers.supervisor import die_with_parent

    return subprocess.Popen([sys.executable, "-m", "app.cli", "job-runner"], env=_settings_env(settings),
                            preexec_fn=die_with_parent)


def cmd_job_runner(args: argparse.Namespace) -> None:
    from app import jobrunner

    jobrunner.main(_settings(args).job_runner_config())


def cmd_models_prepare(args: argparse.Namespace) -> None:
    from worker.model import prepare_embedded_model

    settings = _settings(args)
    started = time.monotonic()
    prepared = prepare_embedded_model(settings.resolved_models_dir)
    sessions = make_sessionmaker(make_engine(settings.resolved_database_url))
    with sessions.begin() as session:
        row = session.scalar(select(BaseCheckpoint).where(BaseCheckpoint.name == prepared.name))
        if row is None:
            row = BaseCheckpoint(name=prepared.name, path=str(prepared.path.resolve()), quantization="bnb-nf4",
                            linear_modules=prepared.linear_modules, max_context=prepared.max_context)
            session.add(row)
        row.path = str(prepared.path.resolve())
        if session.scalar(select(BaseCheckpoint).where(BaseCheckpoint.active.is_(True))) is None:
            row.active = True
    print(f"base model {prepared.name} ready at {prepared.path} ({time.monotonic() - started:.1f}s)", flush=True)


def cmd_worker(args: argparse.Namespace) -> None:
    import uvicorn

    from worker.auth import TOKEN_ENV, check_token
    from worker.runtime import WorkerRuntime
    from worker.server import build_worker_app

    config = WorkerConfig.from_arguments(args)
    token = os.environ.get(TOKEN_ENV) or None  # from the environment: argv is visible to every local user
    try:
        check_token(token, config.host)
    except ValueError as exc:
        raise SystemExit(f"loraplex worker: {exc}") from None
    app = build_worker_app(WorkerRuntime(config), token)
    uvicorn.run(app, host=config.host, port=config.port, log_level="warning")


def build_parser() -> argparse.ArgumentParser:
    from app.admin_commands import cmd_base_models, cmd_jobs, cmd_quantize
    from app.finetune_commands import cmd_finetune

    parser = argparse.ArgumentParser(prog="loraplex", description="Multi-tenant LoRA serving")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start the gateway and its local workers")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    serve.add_argument("--workers", type=int)
    serve.add_argument("--data-dir", dest="data_dir", type=Path)
    serve.set_defaults(func=cmd_serve)

    models = sub.add_parser("models", help="base models")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    prepare = models_sub.add_parser("prepare", help="convert and register the embedded base model")
    prepare.add_argument("--data-dir", dest="data_dir", type=Path)
    prepare.set_defaults(func=cmd_models_prepare)

    worker = sub.add_parser("worker", help="run one worker process (the gateway starts these)")
    WorkerConfig.add_arguments(worker)
    worker.set_defaults(func=cmd_worker)

    runner = sub.add_parser("job-runner", help="run quantization jobs from the database (`serve` starts one)")
    runner.add_argument("--data-dir", dest="data_dir", type=Path)
    runner.set_defaults(func=cmd_job_runner)

    for name, func, text in (("quantize", cmd_quantize, "submit a GPTQ/AWQ quantization job"),
                             ("jobs", cmd_jobs, "list quantization jobs (admin key) or fine-tuning jobs (--api-key)"),
                             ("finetune", cmd_finetune, "fine-tune an adapter on a JSONL chat file (a tenant's key)"),
                             ("base-models", cmd_base_models, "list base models with their quality reports")):
        cmd = sub.add_parser(name, help=text)
        cmd.add_argument("--url", default=os.environ.get("LORAPLEX_URL", "http://127.0.0.1:8000"))
        cmd.add_argument("--admin-key")
        cmd.add_argument("--api-key", help="a tenant's key (or LORAPLEX_API_KEY)")
        cmd.set_defaults(func=func)
        if name == "finetune":
            cmd.add_argument("file", help="JSONL, one {\"messages\": [...]} conversation per line")
            cmd.add_argument("--validation-file")
            cmd.add_argument("--model", help="the base model (default) or one of your adapters to continue from")
            cmd.add_argument("--suffix", help="part of the fine-tuned model's name")
            cmd.add_argument("--epochs", type=int)
            cmd.add_argument("--batch-size", type=int)
            cmd.add_argument("--lr-multiplier", type=float)
            cmd.add_argument("--seed", type=int)
            cmd.add_argument("--follow", action="store_true", help="show progress and the loss until the job ends")
        if name == "quantize":
            cmd.add_argument("--name", required=True, help="name of the new base model")
            cmd.add_argument("--source", default="HuggingFaceTB/SmolLM2-135M-Instruct", help="base model to quantize")
            cmd.add_argument("--method", choices=["gptq", "awq"], default="gptq")
            cmd.add_argument("--bits", type=int, default=4)
            cmd.add_argument("--group-size", type=int, default=64)
            cmd.add_argument("--asymmetric", action="store_true", help="zero-point quantization")
            cmd.add_argument("--samples", type=int, default=16, help="calibration samples")
            cmd.add_argument("--seq-len", type=int, default=256, help="calibration sequence length")
            cmd.add_argument("--calibration-file", help="text file to calibrate on (default: built-in corpus)")
            cmd.add_argument("--follow", action="store_true", help="show progress until the job ends")
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
