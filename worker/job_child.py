"""What every job's child process (quantization, fine-tuning) says to the job runner, and how it ends.

The runner reads the child's stdout: `PROGRESS <stage> <done> <total>` lines, and `done` only once
the result and its report are on disk. The child then exits at once with `os._exit`: libraries can
leave non-daemon threads behind that keep the interpreter from exiting (GPTQModel's AWQ did).
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn


def progress(stage: str, done: int, total: int) -> None:
    print(f"PROGRESS {stage} {done} {total}", flush=True)


def deliver(report: dict[str, Any], path: Path) -> int:
    """Write the report in one rename, then tell the runner the result is complete."""
    partial = path.with_name(path.name + ".part")
    partial.write_text(json.dumps(report, indent=2))
    partial.rename(path)
    progress("done", 1, 1)  # the runner takes the result from here on
    return 0


def run_and_exit(main: Callable[[list[str]], int]) -> NoReturn:
    status = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)
