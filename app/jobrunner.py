"""`loraplex job-runner`: claims quantization jobs from the DB and runs them, one at a time.

Each job runs `python -m worker.quantize` in a child process that writes into a temporary
directory beside the models; only a finished, evaluated result is renamed into place and
registered, in the same step that marks the job succeeded. Cancel kills the child and removes
the directory. A runner that dies takes its child with it (PR_SET_PDEATHSIG); its job stops
sending heartbeats and the next runner to look marks it failed (not re-queued: a job that
killed its runner, say out of memory, would only kill the next one) and removes what it left.
"""

from __future__ import annotations

import collections
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
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from sqlalchemy.exc import SQLAlchemyError

from adapters.db import make_engine, make_sessionmaker
from adapters.jobs import JobStore
from adapters.models import BaseCheckpoint, QuantizationJob
from app.workers.supervisor import die_with_parent

log = logging.getLogger(__name__)

PROGRESS = re.compile(r"PROGRESS (\S+) (\d+) (\d+)")
LAYER = re.compile(r"Quantizing layer (\d+) of (\d+)")  # GPTQModel's own progress line: 0-based, "of" the last
TMP_PREFIX = ".job-"


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


class JobRunner:
    def __init__(self, config: JobRunnerConfig, name: str | None = None) -> None:
        self.config = config
        self.name = name or f"{socket.gethostname()}-{os.getpid()}"
        self.sessions = make_sessionmaker(make_engine(config.database_url))
        self.jobs = JobStore(self.sessions)
        self.models_dir = config.models_dir
        self.stale_after = timedelta(seconds=config.stale_after_s)

    def run_forever(self, stop: threading.Event) -> None:
        log.info("job runner %s polling for quantization jobs", self.name)
        while not stop.is_set():
            try:
                self.reap()
                job = self.jobs.claim(self.name)
            except (SQLAlchemyError, OSError):  # a database that is down now: the next poll tries again
                log.exception("job runner %s could not reach the database; retrying", self.name)
                stop.wait(self.config.poll_interval_s)
                continue
            if job is None:
                stop.wait(self.config.poll_interval_s)
                continue
            try:
                self.run(job, stop)
            except Exception as exc:  # the runner outlives any one job
                log.exception("job %d failed in the runner", job.id)
                self.jobs.finish(job.id, "failed", error=f"runner error: {exc}")

    def reap(self) -> None:
        """Fail jobs whose runner died; remove temporary directories no running job owns."""
        for job_id in self.jobs.reap_stale(self.stale_after):
            log.warning("job %d lost its runner; marked failed", job_id)
        # The directories first, the running jobs after: a runner claims its job before it makes the
        # directory, so every directory listed here whose job still runs is in `running`. (Read the other
        # way round, a job claimed in between would lose the directory its runner just made.)
        leftovers = list(self.models_dir.glob(f"{TMP_PREFIX}*"))
        running = self.jobs.active_ids()
        for tmp in leftovers:
            owner = tmp.name[len(TMP_PREFIX):].split("-", 1)[0]
            if not owner.isdigit() or int(owner) not in running:
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
            state = self._watch(job.id, child, stop or threading.Event())
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

    def _watch(self, job_id: int, child: _Child, stop: threading.Event) -> str:
        while True:
            done = child.wait(self.config.heartbeat_s)
            if stop.is_set() and not done:
                child.kill()
                return "stopped"
            stage, k, n = child.progress
            if self.jobs.heartbeat(job_id, stage, k, n, child.tail()):
                child.kill()
                return "cancelled"
            if done:
                return "succeeded" if child.returncode == 0 else "failed"
            if child.done_at is not None and time.monotonic() - child.done_at > self.config.exit_grace_s:
                # Its result and report are on disk before it says `done`; a library thread that
                # keeps the interpreter from exiting must not hold the job (GPTQModel's AWQ did).
                log.warning("job %d: the quantization process said done but did not exit in %.0f s; killed it",
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
    """The quantization process, its output read on a thread: progress and the log's tail."""

    def __init__(self, argv: list[str], cwd: Path | None = None) -> None:
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
               "GPTQMODEL_CPU_WORKERS": os.environ.get("GPTQMODEL_CPU_WORKERS", "2"), "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                     preexec_fn=die_with_parent)
        self.lines: collections.deque[str] = collections.deque(maxlen=60)
        self.progress: tuple[str | None, int, int] = ("starting", 0, 0)
        self.done_at: float | None = None  # when it said `PROGRESS done`: its result is complete
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
