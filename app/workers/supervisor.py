"""Spawns local worker processes (and the job runner) and restarts them when they die."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from worker.config import WorkerConfig

log = logging.getLogger(__name__)


def visible_gpu_count() -> int:
    """GPUs this host shows, without importing torch (the gateway never does)."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return len([d for d in visible.split(",") if d.strip() and d.strip() != "-1"])
    if shutil.which("nvidia-smi") is None:
        return 0
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    return sum(1 for line in out.splitlines() if line.startswith("GPU "))


def device_for(setting: str, index: int, gpus: int) -> str:
    """Local worker `index`'s device: with GPUs, each worker on its own (round robin past the count)."""
    if setting in ("auto", "cuda") and gpus > 0:
        return f"cuda:{index % gpus}"
    return setting


class LocalWorkerProcess:
    def __init__(self, config: WorkerConfig, env: dict[str, str] | None = None) -> None:
        self.config = config
        self.env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        self._last_start = 0.0

    def start(self) -> None:
        self._last_start = time.monotonic()
        argv = [sys.executable, "-m", "app.cli", "worker", "--config-json", self.config.to_json()]
        self.proc = subprocess.Popen(argv, env=self.env, preexec_fn=die_with_parent)
        log.info("started worker on port %d (pid %d)", self.config.port, self.proc.pid)

    def relaunch(self, model_path: str, model_name: str) -> None:
        """Start again (after `stop`) on another base model."""
        self.config = dataclasses.replace(self.config, model_path=Path(model_path), model_name=model_name)
        self.start()

    def exited(self) -> bool:
        return self.proc is not None and self.proc.poll() is not None

    @property
    def started_at(self) -> float:
        return self._last_start

    def restart(self) -> bool:
        """Start again after an exit; False while backing off (a worker that dies at once must not spin)."""
        if time.monotonic() - self._last_start < min(30.0, 2.0 * 2**self.restarts):
            return False
        code = self.proc.returncode if self.proc else None
        log.warning("worker on port %d exited with %s; restarting", self.config.port, code)
        self.restarts += 1
        self.start()
        return True

    def kill_and_restart(self) -> None:
        """Replace a hung worker: SIGKILL (a hung process may ignore SIGTERM), then start anew."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.restarts += 1
        self.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self.proc is not None:
            terminate(self.proc, timeout)


class SupervisedProcess:
    """A child `serve` keeps running (the job runner): restarted whenever it exits, with a backoff
    (1 s doubling to 60 s; back to 1 s once it ran a minute) so one that dies at once cannot spin."""

    def __init__(self, name: str, start: Callable[[], subprocess.Popen[bytes]], poll_s: float = 1.0) -> None:
        self.name, self._start, self.poll_s = name, start, poll_s
        self.proc = start()
        self.restarts = 0
        self._started = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name=f"supervise-{name}", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        backoff = 1.0
        while not self._stop.wait(self.poll_s):
            if self.proc.poll() is None:
                continue
            ran = time.monotonic() - self._started
            backoff = 1.0 if ran > 60 else min(60.0, backoff * 2)
            log.warning("%s exited with %s after %.0f s; restarting in %.0f s", self.name, self.proc.returncode,
                        ran, backoff)
            if self._stop.wait(backoff):
                return
            self.proc, self._started = self._start(), time.monotonic()
            self.restarts += 1

    def stop(self, timeout: float = 30.0) -> None:
        self._stop.set()
        self._thread.join(timeout)
        terminate(self.proc, timeout)


def terminate(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """SIGTERM, and SIGKILL if it has not exited within `timeout`; nothing if it already exited."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def die_with_parent() -> None:
    """Linux: a child gets SIGTERM when its parent dies, so no orphan keeps a port or a half-done job."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        pr_set_pdeathsig = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
