"""Native CPU kernels: C files under `worker/csrc/`, compiled when a worker first needs them.

Each is built for the host it runs on (`-march=native`) into a temporary directory and loaded
with ctypes; the caller checks it against torch on a probe before using it, and keeps torch's
own path (logged) where there is no C compiler, the build fails or hangs, or the probe disagrees.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import tempfile
from pathlib import Path

CSRC = Path(__file__).parent / "csrc"
# Finite-math and signed-zero freedom let the compiler vectorize max and select; sums keep their
# written order (no -ffast-math, no reassociation), so a row's result never depends on its batch.
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-ffinite-math-only", "-fno-signed-zeros",
         "-std=c11", "-shared", "-fPIC"]


class NoCompiler(OSError):
    """Neither `cc` nor `gcc` is on the PATH."""


def build(source: Path) -> tuple[ctypes.CDLL, bool]:
    """Compile and load `source`; the library and whether it has OpenMP, which spreads its work over
    torch's threads (the same runtime: torch has loaded libgomp first).

    Raises NoCompiler, OSError (a library that will not load) or subprocess.SubprocessError (a failed
    or hung compiler).
    """
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise NoCompiler("no C compiler (cc or gcc) on the PATH")
    with tempfile.TemporaryDirectory(prefix="loraplex-kernel-") as work:
        library = Path(work) / f"{source.stem}.so"
        for openmp in (True, False):
            built = subprocess.run(
                [compiler, *FLAGS, *(["-fopenmp"] if openmp else []), "-o", str(library), str(source)],
                capture_output=True, text=True, timeout=120,
            )  # fmt: skip
            if built.returncode == 0:
                return ctypes.CDLL(str(library)), openmp  # loaded: the file may go
    raise subprocess.SubprocessError(f"{compiler} could not compile {source.name}: {built.stderr.strip()}")
