"""`loraplex job-runner`: claims quantization and fine-tuning jobs from the DB and runs them, one at a time.

Each job runs in a child process (`python -m worker.quantize`, `python -m worker.finetune`) that
writes into a temporary directory beside the models; only a finished, evaluated result is
registered (a base model moved into place, or an adapter version through the registry), in the
same step that marks the job succeeded. Cancel kills the child and removes
the directory. A runner that dies takes its child with it (PR_SET_PDEATHSIG); its job stops
sending heartbeats and the next runner to look marks it failed (not re-queued: a job that
killed its runner, say out of memory, would only kill the next one) and removes what it left.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy.exc import SQLAlchemyError

from adapters.blobstore import open_blob_store
from adapters.db import make_engine, make_sessionmaker
from adapters.finetuning import FineTuningJobs
from adapters.jobs import JobStore, JobTable
from adapters.models import BaseCheckpoint, FineTuningJob, QuantizationJob
from adapters.registry import AdapterRegistry
from app.workers.supervisor import die_with_parent

log = logging.getLogger(__name__)

PROGRESS = re.compile(r"PROGRESS (\S+) (\d+) (\d+)")
LAYER = re.compile(r"Quantizing layer (\d+) of (\d+)")  # GPTQModel's own progress line: 0-based, "of" the last
TMP_PREFIX = ".job-"
FT_TMP_PREFIX = ".ftjob-"


@dataclass(frozen=True)
class JobRunnerConfig:
    """What a job runner process needs, and nothing of the gateway's."""

    database_url: str
    data_dir: Path  # quantization children run here (GPTQModel writes its logs under it)
    models_dir: Path  # results go to models/quantized/
    poll_interval_s: float = 2.0
    heartbeat_s: float = 2.0
    stale_after_s: float = 30.0  # no heartbeat this long: the runner died
    exit_grace_s: float = 30.0  # a child that reported `done` and has not exited this long after is killed
    # Fine-tuning: results are registered as adapters, like uploads, so the runner reads the blob store too.
    blob_url: str | None = None  # default: <data_dir>/blobs
    max_lora_rank: int = 32
    max_adapter_delta: float = 1000.0
    train_threads: int = 2  # torch threads of a training process
    max_example_tokens: int = 2048  # per training example (and never above the base's context)
    micro_batch_tokens: int = 2048  # padded tokens in one forward pass (at least one example)
    max_validation_tokens: int = 200_000  # a validation file's, in all (evaluated before and after training)
    max_training_examples: int = 50_000


class JobRunner:
    def __init__(self, config: JobRunnerConfig, name: str | None = None) -> None:
        self.config = config
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.sessions = make_sessionmaker(make_engine(config.database_url))
        self.jobs = JobStore(self.sessions)
        self.finetunes = FineTuningJobs(self.sessions)
        self._registry: AdapterRegistry | None = None
        self.models_dir = config.models_dir
        self.stale_after = timedelta(seconds=config.stale_after_s)

    def run_forever(self, stop: threading.Event) -> None:
        log.info("job runner %s polling for quantization and fine-tuning jobs", self.name)
        while not stop.is_set():
            try:
                self.reap()
                job: QuantizationJob | FineTuningJob | None = self.jobs.claim(self.name)
                if job is None:
                    job = self.finetunes.claim(self.name)
            except (SQLAlchemyError, OSError):  # a database that is down now: the next poll tries again
                log.exception("job runner %s could not reach the database; retrying", self.name)
                stop.wait(self.config.poll_interval_s)
                continue
            if job is None:
                stop.wait(self.config.poll_interval_s)
                continue
            try:
                if isinstance(job, FineTuningJob):
                    self.run_finetune(job, stop)
                else:
                    self.run(job, stop)
            except Exception as exc:  # the runner outlives any one job
                log.exception("job %d failed in the runner", job.id)
                table: JobTable[Any] = self.finetunes if isinstance(job, FineTuningJob) else self.jobs
                table.finish(job.id, "failed", error=f"runner error: {exc}")

    def reap(self) -> None:
        """Fail jobs whose runner died; remove temporary directories no running job owns."""
        for prefix, table in ((TMP_PREFIX, self.jobs), (FT_TMP_PREFIX, self.finetunes)):
            for job_id in table.reap_stale(self.stale_after):
                log.warning("job %d (%s) lost its runner; marked failed", job_id, table.model.__tablename__)
            # The directories first, the running jobs after: a runner claims its job before it makes the
            # directory, so every directory listed here whose job still runs is in `running`. (Read the other
            # way round, a job claimed in between would lose the directory its runner just made.)
            # A directory is also left alone while it is fresh: its runner touches it with every heartbeat,
            # and a runner of another deployment sharing the volume has jobs this database does not know.
            leftovers = list(self.models_dir.glob(f"{prefix}*"))
            running = table.active_ids()
            for tmp in leftovers:
                owner = tmp.name[len(prefix):].split("-", 1)[0]
                if (not owner.isdigit() or int(owner) not in running) and _untouched_for(tmp, self.stale_after):
                    shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)

    def run(self, job: QuantizationJob, stop: threading.Event | None = None) -> None:
        with self.sessions() as session:
            source = session.get(BaseCheckpoint, job.source_id)
            assert source is not None
            source_path = source.path
        self.models_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.models_dir / f"{TMP_PREFIX}{job.id}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        spec_file = tmp / "spec.json"
        spec_file.write_text(json.dumps(job.spec))
        out = tmp / "model"
        log.info("job %d: %s of %s -> %s", job.id, job.spec["method"], source_path, job.name)
        # In the data directory: GPTQModel writes a log file per job under its working directory's logs/.
        child = _Child([sys.executable, "-m", "worker.quantize", str(spec_file), source_path, str(out)],
                       cwd=self.config.data_dir.resolve())
        try:
            state = self._watch(job.id, child, stop or threading.Event(), tmp)
            if state == "succeeded":
                self._register(job, out, child.tail())
            elif state == "stopped":
                self.jobs.finish(job.id, "failed", error="the job runner was stopped", log_tail=child.tail())
            else:
                error = None if state == "cancelled" else f"quantization exited with {child.returncode}: " + (
                    child.last_line() or "no output")
                self.jobs.finish(job.id, state, error=error, log_tail=child.tail())
        finally:
            child.kill()
            shutil.rmtree(tmp, ignore_errors=True)

    def _watch(self, job_id: int, child: _Child, stop: threading.Event, workdir: Path,
               table: JobTable[Any] | None = None) -> str:
        table = table or self.jobs
        while True:
            done = child.wait(self.config.heartbeat_s)
            with contextlib.suppress(OSError):  # gone: the child fails on its own and says why
                os.utime(workdir)  # fresh: no runner of another deployment reaps it (see `reap`)
            if stop.is_set() and not done:
                child.kill()
                return "stopped"
            stage, k, n = child.progress
            if table.heartbeat(job_id, stage, k, n, child.tail(), child.take_events()):
                child.kill()
                return "cancelled"
            if done:
                return "succeeded" if child.returncode == 0 else "failed"
            if child.done_at is not None and time.monotonic() - child.done_at > self.config.exit_grace_s:
                # Its result and report are on disk before it says `done`; a library thread that
                # keeps the interpreter from exiting must not hold the job (GPTQModel's AWQ did).
                log.warning("job %d: its process said done but did not exit in %.0f s; killed it",
                            job_id, self.config.exit_grace_s)
                child.kill()
                return "succeeded"

    def _register(self, job: QuantizationJob, out: Path, log_tail: str) -> None:
        report = json.loads((out / "loraplex_report.json").read_text())
        final = _move_into_place(out, self.models_dir / "quantized" / f"{job.name}-job{job.id}")
        try:
            self.jobs.succeed(job.id, str(final.resolve()), job.spec["method"], report, log_tail)
        except Exception:
            shutil.rmtree(final, ignore_errors=True)  # cancelled at the last moment, or the DB failed
            raise
        log.info("job %d succeeded: base model %s at %s", job.id, job.name, final)

    # -- fine-tuning ----------------------------------------------------------------------
    @property
    def registry(self) -> AdapterRegistry:
        if self._registry is None:
            blobs = open_blob_store(self.config.blob_url or str((self.config.data_dir / "blobs").resolve()))
            self._registry = AdapterRegistry(self.sessions, blobs, self.config.max_lora_rank,
                                             self.config.max_adapter_delta)
        return self._registry

    def run_finetune(self, job: FineTuningJob, stop: threading.Event | None = None) -> None:
        from worker.finetune_spec import FAILED_EXIT, TrainingPlan

        with self.sessions() as session:
            base = session.get(BaseCheckpoint, job.base_model_id)
            assert base is not None
            base_path, base_name, context = base.path, base.name, base.max_context
        self.models_dir.mkdir(parents=True, exist_ok=True)
        tmp = self.models_dir / f"{FT_TMP_PREFIX}{job.id}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            plan = TrainingPlan(
                spec={k: job.spec[k] for k in FINETUNE_SPEC_FIELDS}, base_path=base_path, base_name=base_name,
                training_file=self._fetch_file(job, job.training_file, tmp / "training.jsonl"),
                validation_file=(self._fetch_file(job, job.validation_file, tmp / "validation.jsonl")
                                 if job.validation_file else None),
                init_adapter=self._fetch_adapter(job, tmp / "init"),
                max_example_tokens=min(context, self.config.max_example_tokens),
                micro_batch_tokens=self.config.micro_batch_tokens,
                max_validation_tokens=self.config.max_validation_tokens,
                max_examples=self.config.max_training_examples,
                token_budget=self.finetunes.tokens_left_today(job),
            )
            (tmp / "plan.json").write_text(json.dumps(asdict(plan)))
            out = tmp / "out"
            out.mkdir()
            log.info("fine-tuning job %s: %d epochs on %s", job.public_id, plan.spec["n_epochs"], base_name)
            child = _Child([sys.executable, "-m", "worker.finetune", str(tmp / "plan.json"), str(out)], cwd=tmp,
                           threads=self.config.train_threads)
            try:
                state = self._watch(job.id, child, stop or threading.Event(), tmp, self.finetunes)
                self._record_events(job.id, child)
                if state == "succeeded":
                    self._register_adapter(job, out, child.tail())
                elif state == "stopped":
                    self.finetunes.end(job.id, "failed", "the job runner was stopped", child.tail(), "runner_stopped")
                elif state == "cancelled":
                    self.finetunes.end(job.id, "cancelled", None, child.tail())
                elif child.returncode == FAILED_EXIT and child.refusal is not None:
                    self.finetunes.end(job.id, "failed", child.refusal["message"], child.tail(),
                                       child.refusal["code"])
                else:
                    self.finetunes.end(job.id, "failed", f"training exited with {child.returncode}: "
                                       + (child.last_line() or "no output"), child.tail(), "training_error")
            finally:
                child.kill()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _record_events(self, job_id: int, child: _Child) -> None:
        """Events the child printed after the last heartbeat."""
        events = child.take_events()
        if events:
            with self.sessions.begin() as session:
                self.finetunes.record_events(session, job_id, events)

    def _fetch_file(self, job: FineTuningJob, file_id: str, target: Path) -> str:
        from adapters.models import TrainingFile

        with self.sessions() as session:
            row = session.get(TrainingFile, file_id)
        if row is None or row.tenant_id != job.tenant_id:
            raise RuntimeError(f"file {file_id} was deleted before the job started")
        target.write_bytes(self.registry.blobs.get(row.sha256))
        return str(target)

    def _fetch_adapter(self, job: FineTuningJob, target: Path) -> str | None:
        continued = job.spec.get("continued")
        if not continued:
            return None
        target.mkdir()
        (target / "adapter_model.safetensors").write_bytes(self.registry.blobs.get(continued["weights_sha256"]))
        (target / "adapter_config.json").write_bytes(self.registry.blobs.get(continued["config_sha256"]))
        return str(target)

    def _register_adapter(self, job: FineTuningJob, out: Path, log_tail: str) -> None:
        """The trained adapter becomes version 1 of `ft:<base>:<suffix>:<id>`, through the same validation as
        an upload; the job succeeds in the next step, and a job cancelled in between takes the adapter back."""
        from adapters.registry import StorageQuota, StorageQuotaExceeded
        from adapters.validation import AdapterFiles, InvalidAdapter

        report = json.loads((out / "report.json").read_text())
        files = AdapterFiles(config=(out / "adapter" / "adapter_config.json").read_bytes(),
                             weights=(out / "adapter" / "adapter_model.safetensors").read_bytes())
        name = fine_tuned_name(job.spec.get("served_base", ""), job.suffix, job.public_id)
        quota = StorageQuota(**job.spec["storage_quota"])
        try:
            self.registry.create_version(job.tenant_id, name, files, quota, fine_tuned=True)
        except (InvalidAdapter, StorageQuotaExceeded) as exc:
            code = "quota_exceeded" if isinstance(exc, StorageQuotaExceeded) else "invalid_result"
            self.finetunes.end(job.id, "failed", f"the trained adapter could not be registered: {exc}", log_tail, code)
            return
        if not self.finetunes.succeed(job.id, name, report, log_tail):
            self.registry.delete(job.tenant_id, name)  # cancelled (or reaped) while it was being registered
            log.info("fine-tuning job %s ended before its adapter was registered; removed %s", job.public_id, name)
            return
        log.info("fine-tuning job %s succeeded: adapter %s", job.public_id, name)


FINETUNE_SPEC_FIELDS = ("n_epochs", "batch_size", "learning_rate_multiplier", "seed", "lora_rank", "lora_alpha",
                        "lora_dropout", "target_modules", "continue_from")


def fine_tuned_name(served_base: str, suffix: str | None, public_id: str) -> str:
    """OpenAI's shape, `ft:<base>:<suffix>:<id>`: the base's last path part (at most 48 characters), the
    tenant's suffix (may be empty), and the job's id without its prefix's randomness cut short."""
    base = "".join(c if c.isalnum() or c in "._-" else "-" for c in served_base.rsplit("/", 1)[-1])[:48] or "base"
    return f"ft:{base}:{suffix or ''}:{public_id.removeprefix('ftjob-')[:12]}"


def _untouched_for(path: Path, age: timedelta) -> bool:
    try:
        return time.time() - path.stat().st_mtime >= age.total_seconds()
    except FileNotFoundError:
        return False


def _move_into_place(out: Path, wanted: Path) -> Path:
    """Rename the result to `wanted`, or beside it when a directory of that name is already there
    (a restored database, another deployment on the same volume): never fail the job's work for it."""
    wanted.parent.mkdir(parents=True, exist_ok=True)
    final = wanted
    for _ in range(8):
        try:
            os.rename(out, final)  # same filesystem: atomic; refuses a non-empty destination
            return final
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR):
                raise
            log.warning("%s exists already; the result goes beside it", final)
            final = wanted.with_name(f"{wanted.name}-{secrets.token_hex(4)}")
    raise RuntimeError(f"no free directory name beside {wanted}")


class _Child:
    """A job's process, its output read on a thread: progress, events, a refusal and the log's tail."""

    def __init__(self, argv: list[str], cwd: Path | None = None, threads: int | None = None) -> None:
        omp = str(threads) if threads is not None else os.environ.get("OMP_NUM_THREADS", "1")
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": omp,
               "GPTQMODEL_CPU_WORKERS": os.environ.get("GPTQMODEL_CPU_WORKERS", "2"), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                     preexec_fn=die_with_parent)
        self.lines: collections.deque[str] = collections.deque(maxlen=60)
        self.progress: tuple[str | None, int, int] = ("starting", 0, 0)
        self.done_at: float | None = None  # when it said `PROGRESS done`: its result is complete
        self.refusal: dict[str, str] | None = None  # `FAILED {code, message}`: the job cannot run as asked
        self._events: list[dict[str, Any]] = []  # `EVENT {...}` lines not yet recorded
        self._events_lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        partial = b""
        while chunk := self.proc.stdout.read1(65536):  # type: ignore[attr-defined]
            partial += chunk
            *complete, partial = re.split(rb"[\r\n]", partial)  # progress bars redraw with \r
            for raw in complete:
                self._line(raw.decode(errors="replace").strip())

    def _line(self, line: str) -> None:
        if not line:
            return
        kind, _, payload = line.partition(" ")
        if kind in ("EVENT", "FAILED"):
            try:
                value = json.loads(payload)
            except ValueError:
                value = None
            if isinstance(value, dict):
                if kind == "FAILED":
                    self.refusal = {"code": str(value.get("code", "error")), "message": str(value.get("message"))}
                else:
                    with self._events_lock:
                        self._events.append(value)
                return
        if (m := PROGRESS.search(line)) is not None:
            self.progress = (m.group(1), int(m.group(2)), int(m.group(3)))
            if m.group(1) == "done":
                self.done_at = time.monotonic()
            return
        if (m := LAYER.search(line)) is not None:
            self.progress = ("quantizing", int(m.group(1)) + 1, int(m.group(2)) + 1)  # layer k of n, 1-based
            line = m.group(0)
        if not self.lines or self.lines[-1] != line:
            self.lines.append(line[:400])

    def take_events(self) -> list[dict[str, Any]]:
        with self._events_lock:
            events, self._events = self._events, []
        return events

    def wait(self, timeout: float) -> bool:
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        self._reader.join(5)
        return True

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def tail(self) -> str:
        return "\n".join(self.lines)

    def last_line(self) -> str:
        errors = [line for line in self.lines if "Error" in line]
        return (errors or list(self.lines) or [""])[-1]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def main(config: JobRunnerConfig) -> None:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    JobRunner(config).run_forever(stop)
